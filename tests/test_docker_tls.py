"""TLS in Docker without Docker: the container health probe (docker/healthcheck.py) against real gRPC
health servers on loopback, plaintext and mutual TLS with certificates from scripts/make_certs.sh;
docker/entrypoint.sh turning TLS_* / TOKEN_FILE into flags; make_certs.sh's per-client names, the
coordinator certificate's clientAuth and KEY_UID."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "subspacefl.v1.Coordinator"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("docker_healthcheck", ROOT / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load_healthcheck()


def make_certs(out: Path, names: str = "localhost,127.0.0.1", clients: str = "1",
               env: dict[str, str] | None = None) -> Path:
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out), names, clients], check=True,
                   capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """Certificates for the name `coordinator` only: not the probed 127.0.0.1, as in a compose project."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return make_certs(tmp_path_factory.mktemp("certs"), "coordinator", "1")


@contextmanager
def health_server(certs: Path | None = None, status=health_pb2.HealthCheckResponse.SERVING,
                  server_cert: str = "server") -> Iterator[str]:
    """A gRPC health service on 127.0.0.1 (mutual TLS with `certs`), like the coordinator's; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set(SERVICE, status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if certs is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials(
            [((certs / f"{server_cert}.key").read_bytes(), (certs / f"{server_cert}.pem").read_bytes())],
            root_certificates=(certs / "ca.pem").read_bytes(), require_client_auth=True)
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait(10)


def tls_files(certs: Path, name: str = "server") -> tuple[str, str, str]:
    return str(certs / "ca.pem"), str(certs / f"{name}.pem"), str(certs / f"{name}.key")


# --------------------------------------------------------------------------- the health probe
def test_plaintext_probe_still_works() -> None:
    with health_server() as address:
        healthy, message = healthcheck.probe(address, SERVICE, 5.0)
    assert healthy, message
    assert message.endswith("SERVING")


def test_tls_probe_passes_a_coordinator_that_requires_client_certificates(certs: Path) -> None:
    # The probe presents the coordinator's own certificate and checks the connection against the name the
    # certificate holds (`coordinator`), although it dials 127.0.0.1.
    with health_server(certs) as address:
        healthy, message = healthcheck.probe(address, SERVICE, 5.0, tls_files(certs))
    assert healthy, message
    assert "(TLS, certificate name coordinator)" in message and message.endswith("SERVING")


def test_tls_probe_prefers_the_probed_address_when_the_certificate_names_it(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = make_certs(tmp_path / "certs", "coordinator,127.0.0.1", "1")
    with health_server(certs) as address:
        healthy, message = healthcheck.probe(address, SERVICE, 5.0, tls_files(certs))
    assert healthy, message
    assert "certificate name 127.0.0.1" in message


def test_tls_probe_reports_not_serving(certs: Path) -> None:
    with health_server(certs, status=health_pb2.HealthCheckResponse.NOT_SERVING) as address:
        healthy, message = healthcheck.probe(address, SERVICE, 5.0, tls_files(certs))
    assert not healthy and message.endswith("NOT_SERVING")


def test_tls_probe_against_a_plaintext_coordinator_says_so(certs: Path) -> None:
    with health_server() as address:
        healthy, message = healthcheck.probe(address, SERVICE, 5.0, tls_files(certs))
    assert not healthy
    assert "does not answer with TLS" in message


def test_tls_probe_with_a_certificate_from_another_ca(certs: Path, tmp_path: Path) -> None:
    foreign = make_certs(tmp_path / "foreign", "coordinator", "1")
    with health_server(certs) as address:
        healthy, message = healthcheck.probe(address, SERVICE, 5.0, tls_files(foreign))
    assert not healthy
    assert "does not verify against TLS_CA" in message


def test_tls_probe_names_a_coordinator_certificate_without_client_auth(certs: Path, tmp_path: Path) -> None:
    # A coordinator certificate issued for serverAuth only (as make certs did before): the coordinator
    # refuses it as the probe's client certificate, and the probe says what the certificate lacks.
    old = tmp_path / "old"
    old.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy(certs / name, old / name)
    (old / "ext").write_text("subjectAltName=DNS:coordinator\nextendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=coordinator",
                    "-keyout", str(old / "server.key"), "-out", str(old / "server.csr")],
                   check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-in", str(old / "server.csr"), "-CA", str(old / "ca.pem"),
                    "-CAkey", str(old / "ca.key"), "-CAcreateserial", "-days", "1", "-extfile", str(old / "ext"),
                    "-out", str(old / "server.pem")], check=True, capture_output=True, timeout=60)
    with health_server(old) as address:
        healthy, message = healthcheck.probe(address, SERVICE, 5.0, tls_files(old))
    assert not healthy
    assert "clientAuth" in message, message


def test_main_takes_the_tls_files_from_the_environment(certs: Path, monkeypatch, capsys) -> None:
    ca, cert, key = tls_files(certs)
    monkeypatch.setenv("TLS_CA", ca)
    monkeypatch.setenv("TLS_CERT", cert)
    monkeypatch.setenv("TLS_KEY", key)
    with health_server(certs) as address:
        assert healthcheck.main(["--force", "--address", address]) == 0
    assert "TLS" in capsys.readouterr().out
    monkeypatch.delenv("TLS_KEY")
    assert healthcheck.main(["--force", "--address", "127.0.0.1:1"]) == 1
    assert "needs TLS_CA, TLS_CERT and TLS_KEY" in capsys.readouterr().out


def test_a_container_without_a_coordinator_is_healthy(monkeypatch) -> None:
    monkeypatch.setenv("TLS_CERT", "/nowhere.pem")
    monkeypatch.setattr(healthcheck, "runs_coordinator", lambda: False)
    assert healthcheck.main([]) == 0


# --------------------------------------------------------------------------- docker/entrypoint.sh
def entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """docker/entrypoint.sh with a stand-in python that prints what it is asked to run."""
    (tmp_path / "python").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "python").chmod(0o755)
    return subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *args],
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", **env}, capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.fixture()
def tls_env(tmp_path: Path) -> dict[str, str]:
    """TLS_CA, TLS_CERT, TLS_KEY naming files that exist (the entrypoint checks that it can read them)."""
    files = {}
    for variable, name in (("TLS_CA", "ca.pem"), ("TLS_CERT", "cert.pem"), ("TLS_KEY", "key.pem")):
        (tmp_path / name).write_text("PEM\n")
        files[variable] = str(tmp_path / name)
    return files


def test_entrypoint_starts_a_mutual_tls_coordinator(tmp_path: Path, tls_env: dict[str, str]) -> None:
    words = entrypoint(tmp_path, "coordinator", "num_rounds=2", TOKEN_FILE="/run/secrets/token", **tls_env)
    assert words.stdout.split() == [
        "-m", "server", "--config", "configs/minilm_bbc.yaml", "--address", "0.0.0.0:50051",
        "--token-file", "/run/secrets/token", "--tls-ca", tls_env["TLS_CA"], "--tls-cert", tls_env["TLS_CERT"],
        "--tls-key", tls_env["TLS_KEY"], "num_rounds=2"]


def test_entrypoint_tls_without_client_certificates(tmp_path: Path, tls_env: dict[str, str]) -> None:
    words = entrypoint(tmp_path, "coordinator", TLS_REQUIRE_CLIENT_CERT="0", **tls_env).stdout.split()
    assert "--tls-cert" in words and "--tls-ca" not in words


@pytest.mark.parametrize("role, change, message", [
    ("coordinator", {"TLS_CA": ""}, "TLS_CERT without TLS_CA"),
    ("coordinator", {"TLS_REQUIRE_CLIENT_CERT": "maybe"}, "use 1 or 0"),
    # a key the container's user cannot read (here: one that is not there), before Python stumbles on it
    ("coordinator", {"TLS_KEY": "/nonexistent/key.pem"}, "/nonexistent/key.pem is missing or not readable"),
    ("client", {"TLS_KEY": "/nonexistent/key.pem"}, "make certs KEY_UID="),
])
def test_entrypoint_refuses_a_tls_setup_that_cannot_work(tmp_path: Path, tls_env: dict[str, str], role: str,
                                                          change: dict[str, str], message: str) -> None:
    result = entrypoint(tmp_path, role, **{**tls_env, **change})
    assert result.returncode == 2 and message in result.stderr and not result.stdout, result


def test_entrypoint_gives_a_client_its_certificate_and_the_token_file(tmp_path: Path, tls_env: dict[str, str]) -> None:
    words = entrypoint(tmp_path, "client", "--patience", "9", CLIENT_NAME="client-1", TOKEN_FILE="/t",
                       **tls_env).stdout.split()
    assert words == ["-m", "client", "--coordinator", "coordinator:50051", "--name", "client-1", "--device", "cpu",
                     "--tls-ca", tls_env["TLS_CA"], "--tls-cert", tls_env["TLS_CERT"], "--tls-key", tls_env["TLS_KEY"],
                     "--token-file", "/t", "--patience", "9"]
    plain = entrypoint(tmp_path, "client", CLIENT_NAME="client-1", TLS_CA="", TLS_CERT="").stdout.split()
    assert not any(word.startswith(("--tls", "--token")) for word in plain)


# --------------------------------------------------------------------------- scripts/make_certs.sh
@needs_openssl
def test_make_certs_names_clients_and_lets_the_coordinator_certificate_authenticate_a_client(tmp_path: Path) -> None:
    out = make_certs(tmp_path / "certs", "coordinator,localhost", "client-1,gpu-a-0")
    assert sorted(p.name for p in out.glob("*.key")) == ["ca.key", "client-1.key", "gpu-a-0.key", "server.key"]
    usage = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext",
                            "extendedKeyUsage,subjectAltName"], capture_output=True, text=True, check=True).stdout
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in usage
    assert "DNS:coordinator, DNS:localhost" in usage
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in out.glob("*.key"))
    default = make_certs(tmp_path / "default", "localhost", "")
    assert sorted(p.stem for p in default.glob("client-*.pem")) == ["client-0", "client-1", "client-2", "client-3"]


@needs_openssl
def test_make_certs_rejects_a_client_name_that_is_not_a_file_name(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(tmp_path / "c"), "localhost",
                             "ok,../escape"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "../escape" in result.stderr


@needs_openssl
def test_key_uid_lets_that_user_read_the_keys_but_not_the_ca_key(tmp_path: Path) -> None:
    if shutil.which("setfacl") is None and os.geteuid() != 0:
        pytest.skip("KEY_UID needs setfacl or root")
    out = make_certs(tmp_path / "certs", "localhost", "1", env={"KEY_UID": "10001"})
    ca_key = (out / "ca.key").stat()
    assert ca_key.st_uid == os.geteuid() and ca_key.st_mode & 0o777 == 0o600
    for key in (out / "server.key", out / "client-0.key"):
        if shutil.which("getfacl"):
            acl = subprocess.run(["getfacl", "-cn", str(key)], capture_output=True, text=True, check=True).stdout
            assert "user:10001:r--" in acl and "other::---" in acl and "group::---" in acl
        else:
            assert key.stat().st_uid == 10001 and key.stat().st_mode & 0o777 == 0o600
    if shutil.which("getfacl"):
        assert "10001" not in subprocess.run(["getfacl", "-cn", str(out / "ca.key")], capture_output=True,
                                             text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_certs_passes_every_default_name() -> None:
    # A literal comma list inside $(or ...) once left only `localhost`: the compose name `coordinator` was lost.
    env = {key: value for key, value in os.environ.items()
           if key not in ("CERTS_DIR", "SERVER_NAMES", "CERT_CLIENTS", "KEY_UID", "MAKEFLAGS")}
    dry = subprocess.run(["make", "-s", "-n", "certs"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert 'scripts/make_certs.sh "certs" "localhost,127.0.0.1,::1,coordinator" "4"' in dry
