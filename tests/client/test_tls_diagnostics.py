"""What a client says when TLS fails, and its refusal to send a token in cleartext off this machine.

Every certificate here is made by the test with the openssl command line: a good CA with a coordinator certificate
for 127.0.0.1/localhost and a client certificate, a coordinator certificate for another host name only, an expired
coordinator certificate from the good CA, and a foreign CA with its own client certificate. Each failing case runs
against a real TLS coordinator on loopback and checks that the client stops with one line naming the problem.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from client.connection import ClientSecurity, CoordinatorConnection, InsecureToken, NotAuthenticated
from client.tls_check import diagnose_tls, is_loopback, split_target
from server.security import SecurityConfig
from tests.server.conftest import LiveCoordinator, small_state, start_live_coordinator

ROOT = Path(__file__).resolve().parents[2]

_CA_CONFIG = """\
[ ca ]
default_ca = test_ca
[ test_ca ]
database = {dir}/index.txt
new_certs_dir = {dir}/issued
serial = {dir}/serial
default_md = sha256
policy = any_name
[ any_name ]
commonName = supplied
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(out: Path, name: str, subject: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", f"/CN={subject}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=out)


def _request(out: Path, name: str, extensions: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=out)
    (out / f"{name}.ext").write_text(extensions + "\n")


def _issue(out: Path, name: str, ca: str, extensions: str) -> None:
    _request(out, name, extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=out)


def _issue_expired(out: Path, name: str, ca: str, extensions: str) -> None:
    """`openssl x509 -req` cannot backdate a certificate; `openssl ca` takes explicit dates (with a throwaway
    CA database)."""
    _request(out, name, extensions)
    database = out / "ca-db"
    (database / "issued").mkdir(parents=True)
    (database / "index.txt").write_text("")
    (database / "serial").write_text("01\n")
    (database / "ca.cnf").write_text(_CA_CONFIG.format(dir=database))
    _openssl("ca", "-batch", "-notext", "-config", str(database / "ca.cnf"), "-cert", f"{ca}.pem",
             "-keyfile", f"{ca}.key", "-in", f"{name}.csr", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", cwd=out)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("pki")
    server = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"
    _make_ca(out, "ca", "test good CA")
    _make_ca(out, "foreign-ca", "test foreign CA")
    _issue(out, "server", "ca", server)
    _issue(out, "client", "ca", "extendedKeyUsage=clientAuth")
    _issue(out, "foreign-client", "foreign-ca", "extendedKeyUsage=clientAuth")
    _issue(out, "elsewhere", "ca", "subjectAltName=DNS:elsewhere.invalid\nextendedKeyUsage=serverAuth")
    _issue_expired(out, "expired", "ca", server)
    return out


@contextmanager
def tls_coordinator(tmp_path: Path, pki: Path, server: str = "server",
                    mutual: bool = False) -> Iterator[LiveCoordinator]:
    security = SecurityConfig(tls_cert=str(pki / f"{server}.pem"), tls_key=str(pki / f"{server}.key"),
                              tls_ca=str(pki / "ca.pem") if mutual else None)
    live = start_live_coordinator(tmp_path, small_state(), security=security)
    try:
        yield live
    finally:
        live.stop()


def _client(pki: Path, ca: str = "ca", cert: str | None = None, key: str | None = None) -> ClientSecurity:
    return ClientSecurity(tls_ca=str(pki / f"{ca}.pem"), tls_cert=str(pki / f"{cert}.pem") if cert else None,
                          tls_key=str(pki / f"{key or cert}.key") if cert else None)


def _join_error(address: str, security: ClientSecurity) -> str:
    connection = CoordinatorConnection(address, patience_s=5, security=security)
    try:
        with pytest.raises(NotAuthenticated) as raised:
            connection.join("c", -1)
    finally:
        connection.close()
    message = str(raised.value)
    assert message.startswith(f"TLS with {address} failed: ") and "\n" not in message
    return message


# --------------------------------------------------------------------------- the certificates work
def test_good_certificates_join_and_diagnose_nothing(tmp_path, pki):
    with tls_coordinator(tmp_path / "tls", pki) as live:
        assert diagnose_tls(live.address, _client(pki)) is None
        port = live.address.rsplit(":", 1)[1]
        assert diagnose_tls(f"localhost:{port}", _client(pki)) is None
        connection = CoordinatorConnection(f"localhost:{port}", patience_s=5, security=_client(pki))
        assert connection.join("c", -1).partition_index == 0
        connection.close()
    with tls_coordinator(tmp_path / "mutual", pki, mutual=True) as live:
        assert diagnose_tls(live.address, _client(pki, cert="client")) is None
        connection = CoordinatorConnection(live.address, patience_s=5, security=_client(pki, cert="client"))
        assert connection.join("c", -1).partition_index == 0
        connection.close()


# --------------------------------------------------------------------------- each certificate problem, named
def test_unknown_ca_names_the_tls_ca_file(tmp_path, pki):
    with tls_coordinator(tmp_path, pki) as live:
        message = _join_error(live.address, _client(pki, ca="foreign-ca"))
    assert "signed by a CA this client does not trust" in message
    assert f"--tls-ca {pki / 'foreign-ca.pem'}" in message


def test_wrong_host_name_names_the_host_and_the_fix(tmp_path, pki):
    with tls_coordinator(tmp_path, pki, server="elsewhere") as live:
        message = _join_error(live.address, _client(pki))
    assert "certificate is not valid for 127.0.0.1" in message
    assert "make certs SERVER_NAMES=127.0.0.1" in message


def test_expired_server_certificate(tmp_path, pki):
    with tls_coordinator(tmp_path, pki, server="expired") as live:
        message = _join_error(live.address, _client(pki))
    assert "the coordinator's certificate has expired" in message


def test_mutual_tls_without_a_client_certificate(tmp_path, pki):
    with tls_coordinator(tmp_path, pki, mutual=True) as live:
        message = _join_error(live.address, _client(pki))
    assert "requires a client certificate" in message and "--tls-cert and --tls-key" in message
    assert live.coordinator.registry.num_joined() == 0


def test_mutual_tls_refuses_a_certificate_from_another_ca(tmp_path, pki):
    with tls_coordinator(tmp_path, pki, mutual=True) as live:
        message = _join_error(live.address, _client(pki, cert="foreign-client"))
    assert f"refused this client's certificate --tls-cert {pki / 'foreign-client.pem'}" in message
    assert live.coordinator.registry.num_joined() == 0


def test_client_key_that_does_not_match_its_certificate(tmp_path, pki):
    with tls_coordinator(tmp_path, pki, mutual=True) as live:
        message = _join_error(live.address, _client(pki, cert="client", key="foreign-client"))
    assert f"--tls-key {pki / 'foreign-client.key'} does not belong to its certificate" in message


def test_tls_client_against_a_plaintext_coordinator(tmp_path, pki):
    live = start_live_coordinator(tmp_path, small_state())
    try:
        message = _join_error(live.address, _client(pki))
    finally:
        live.stop()
    assert "does not answer with TLS" in message


def test_unreadable_files_are_named_before_dialing(pki, tmp_path):
    missing = str(tmp_path / "missing.pem")
    assert diagnose_tls("127.0.0.1:1", ClientSecurity(tls_ca=missing)) == \
        f"cannot read the CA file --tls-ca {missing}: No such file or directory"
    problem = diagnose_tls("127.0.0.1:1", ClientSecurity(tls_ca=str(pki / "ca.pem"), tls_cert=missing,
                                                         tls_key=str(pki / "client.key")))
    assert problem.startswith("cannot read this client's certificate or key") and missing in problem


def test_unreachable_coordinator_has_no_diagnosis(pki):
    assert diagnose_tls("127.0.0.1:1", _client(pki)) is None


def test_client_process_exits_4_with_one_line_for_an_expired_certificate(tmp_path, pki):
    with tls_coordinator(tmp_path, pki, server="expired") as live:
        env = {key: value for key, value in os.environ.items() if key != "SUBSPACEFL_TOKEN"}
        result = subprocess.run([sys.executable, "-m", "client", "--coordinator", live.address,
                                 "--tls-ca", str(pki / "ca.pem"), "--patience", "10", "--name", "x"],
                                cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 4, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"TLS with {live.address} failed: the coordinator's certificate has expired" in errors[0]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- no token in cleartext off this machine
@pytest.fixture
def no_channels(monkeypatch):
    """Creating a channel is the first step towards sending anything: fail loudly if it happens."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a channel was created")
    monkeypatch.setattr(grpc, "insecure_channel", refuse)
    monkeypatch.setattr(grpc, "secure_channel", refuse)


def test_token_in_cleartext_to_another_host_is_refused_before_any_channel(no_channels):
    with pytest.raises(InsecureToken) as raised:
        CoordinatorConnection("10.1.2.3:50051", security=ClientSecurity(token="t"))
    message = str(raised.value)
    assert "the token would travel in cleartext to 10.1.2.3" in message
    assert "--tls-ca" in message and "--allow-insecure-token" in message
    assert isinstance(raised.value, ValueError)
    with pytest.raises(InsecureToken, match="cleartext to coordinator,"):
        CoordinatorConnection("coordinator:50051", security=ClientSecurity(token="t"))   # names are not resolved
    with pytest.raises(InsecureToken, match="cleartext to fd00::5,"):
        CoordinatorConnection("[fd00::5]:50051", security=ClientSecurity(token="t"))


@pytest.mark.parametrize("address, security", [
    ("10.1.2.3:50051", ClientSecurity(token="t", allow_insecure_token=True)),
    ("10.1.2.3:50051", ClientSecurity()),                                   # no token, nothing to protect
    ("127.0.0.1:50051", ClientSecurity(token="t")),
    ("127.8.9.10:50051", ClientSecurity(token="t")),
    ("localhost:50051", ClientSecurity(token="t")),
    ("[::1]:50051", ClientSecurity(token="t")),
])
def test_token_allowed_on_loopback_or_when_told(address, security):
    CoordinatorConnection(address, security=security).close()


def test_token_allowed_over_tls(pki):
    CoordinatorConnection("10.1.2.3:50051", security=ClientSecurity(token="t", tls_ca=str(pki / "ca.pem"))).close()


@pytest.mark.parametrize("address, host, port, loopback", [
    ("127.0.0.1:50051", "127.0.0.1", 50051, True),
    ("localhost:1", "localhost", 1, True),
    ("[::1]:50051", "::1", 50051, True),
    ("dns:///localhost:7", "localhost", 7, True),
    ("10.1.2.3:50051", "10.1.2.3", 50051, False),
    ("coordinator:50051", "coordinator", 50051, False),
    ("[fd00::5]:50051", "fd00::5", 50051, False),
    ("example.org", "example.org", None, False),
    ("ipv4:127.0.0.1:50051", "ipv4:127.0.0.1:50051", None, False),     # other schemes: not taken apart
])
def test_targets_are_parsed_without_resolving_names(address, host, port, loopback):
    assert split_target(address) == (host, port)
    assert is_loopback(address) is loopback


def test_client_process_refuses_a_cleartext_token_before_dialing():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SUBSPACEFL_TOKEN": "t"}
    result = subprocess.run([sys.executable, "-m", "client", "--coordinator", "10.1.2.3:50051", "--patience", "1",
                             "--name", "x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: the token would travel in cleartext to 10.1.2.3")
    assert "--allow-insecure-token" in lines[0]
