"""The Docker files, checked statically (no Docker needed): scripts/check_compose.py on this checkout,
and each of its checks catching the mistake it exists for; where a compose CLI is installed, also
compose's own refusal of the published coordinator without certificates (skipped otherwise)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts import check_compose as cc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base() -> dict:
    return cc.load_compose(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def gpu(base: dict) -> dict:
    return cc.merge(base, cc.load_compose(ROOT / "docker-compose.gpu.yml"))


def test_repository_docker_files_pass() -> None:
    assert cc.check_repository(ROOT) == []


def test_command_line_exits_zero() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_compose.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "docker files OK" in result.stdout


def test_default_federation_shape(base: dict) -> None:
    services = base["services"]
    clients = sorted(name for name, service in services.items() if cc.role(service) == "client")
    assert clients == ["client-1", "client-2", "client-3"]
    words = cc.overrides(services["coordinator"])
    # the defaults a plain `docker compose up` runs: the embedded MiniLM, subspace_reg, 20 rounds, 3 clients
    assert (words["model_name"], words["method"], words["num_rounds"], words["num_clients"]) == \
        ("minilm", "subspace_reg", "20", "3")


def test_environment_overrides_reach_the_coordinator() -> None:
    doc = cc.load_compose(ROOT / "docker-compose.yml", {"METHOD": "fedavg", "ROUNDS": "2", "MODEL": "/cache/tiny"})
    words = cc.overrides(doc["services"]["coordinator"])
    assert (words["method"], words["num_rounds"], words["model_name"]) == ("fedavg", "2", "/cache/tiny")


def test_gpu_variant_reserves_distinct_gpus_one_per_rank(gpu: dict) -> None:
    ids = []
    for name, ranks in (("client-1", 1), ("client-2", 1), ("client-3", 2)):
        service = gpu["services"][name]
        (device,) = cc.gpu_devices(service)
        assert len(device["device_ids"]) == ranks == cc.ranks_per_client(service)
        ids += device["device_ids"]
        # One process on its one GPU; a torchrun client's rank r on cuda:r.
        assert cc.environment(service)["DEVICE"] == ("cuda:0" if ranks == 1 else "cuda")
        assert cc.environment(service)["CLIENT_NAME"] == name   # the base file's environment survives the merge
    assert len(set(ids)) == 4


def test_the_entrypoint_starts_a_multi_gpu_client_with_torchrun(tmp_path) -> None:
    # docker/entrypoint.sh with a stand-in python that prints what it is asked to run.
    (tmp_path / "python").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "python").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "COORDINATOR": "coordinator:50051", "CLIENT_NAME": "client-3",
           "DEVICE": "cuda"}

    def run(extra: dict[str, str]) -> list[str]:
        return subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), "client", "--patience", "9"],
                              env={**env, **extra}, capture_output=True, text=True, timeout=30).stdout.split()

    assert run({"NPROC_PER_CLIENT": "2"}) == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "client", "--coordinator",
        "coordinator:50051", "--name", "client-3", "--device", "cuda", "--patience", "9"]
    assert run({})[:2] == ["-m", "client"]


@pytest.mark.parametrize("var, value, expected", [
    ("${A:-x}", {}, "x"), ("${A:-x}", {"A": ""}, "x"), ("${A-x}", {"A": ""}, ""), ("${A}", {"A": "y"}, "y"),
    ("${A:?need A}", {}, "<A required>"), ("$$HOME", {}, "$HOME"), ("a=${A:---flag v}", {}, "a=--flag v"),
])
def test_interpolation(var: str, value: dict, expected: str) -> None:
    assert cc.interpolate(var, value) == expected


def _drop(path: list[str]) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _set(path: list[str], value) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _remove_service(name: str) -> Callable[[dict], None]:
    return lambda doc: doc["services"].pop(name)


BASE_MISTAKES = [
    ("depends_on without service_healthy",
     _set(["services", "client-2", "depends_on"], ["coordinator"]), "service_healthy"),
    ("no restart policy", _drop(["services", "client-1", "restart"]), "restart"),
    ("coordinator restarts", _set(["services", "coordinator", "restart"], "always"), "finished run"),
    ("runs not on a volume", _set(["services", "coordinator", "volumes"], ["model-cache:/cache"]), "/app/runs"),
    ("cache volume undeclared", _set(["volumes"], {"runs": {}}), "declared"),
    ("num_clients mismatch", _remove_service("client-3"), "num_clients=3"),
    ("two images", _set(["services", "client-1", "image"], "other:1"), "one image"),
    ("same client name", _set(["services", "client-2", "environment", "CLIENT_NAME"], "client-1"), "repeat"),
    ("no shared network", _set(["services", "client-1", "networks"], ["elsewhere"]), "network"),
    ("health check disabled", _set(["services", "coordinator", "healthcheck"], {"disable": True}), "disabled"),
]


@pytest.mark.parametrize("label, mutate, message", BASE_MISTAKES, ids=[m[0] for m in BASE_MISTAKES])
def test_base_mistakes_are_caught(base: dict, label: str, mutate, message: str) -> None:
    doc = copy.deepcopy(base)
    mutate(doc)
    problems = cc.check_local_federation(doc)
    assert any(message in problem for problem in problems), (label, problems)


GPU_MISTAKES = [
    ("count instead of device_ids",
     _set(["services", "client-1", "deploy", "resources", "reservations", "devices"],
          [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]), "device_ids"),
    ("same GPU twice",
     _set(["services", "client-2", "deploy", "resources", "reservations", "devices"],
          [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]), "same GPU"),
    ("no reservation", _drop(["services", "client-3", "deploy"]), "reservations"),
    ("device left on cpu", _set(["services", "client-1", "environment", "DEVICE"], "cpu"), "cuda"),
    ("two ranks on one GPU",
     _set(["services", "client-3", "deploy", "resources", "reservations", "devices"],
          [{"driver": "nvidia", "device_ids": ["2"], "capabilities": ["gpu"]}]), "exactly 2 GPU(s)"),
    ("torchrun ranks on one numbered GPU", _set(["services", "client-3", "environment", "DEVICE"], "cuda:0"),
     "use DEVICE=cuda"),
    ("ranks not a number", _set(["services", "client-3", "environment", "NPROC_PER_CLIENT"], "two"),
     "NPROC_PER_CLIENT='two'"),
]


@pytest.mark.parametrize("label, mutate, message", GPU_MISTAKES, ids=[m[0] for m in GPU_MISTAKES])
def test_gpu_mistakes_are_caught(gpu: dict, label: str, mutate, message: str) -> None:
    doc = copy.deepcopy(gpu)
    mutate(doc)
    problems = cc.check_gpu_clients(doc, ["client-1", "client-2", "client-3"])
    assert any(message in problem for problem in problems), (label, problems)


DOCKERFILE_MISTAKES = [
    ("root user", lambda text: text.replace("USER app", "USER root"), "non-root"),
    ("no health check", lambda text: text.replace("HEALTHCHECK", "# HEALTHCHECK").replace(
        '    CMD ["/opt/venv/bin/python"', '#    CMD ["/opt/venv/bin/python"'), "HEALTHCHECK"),
    ("fixed base", lambda text: text.replace("FROM ${BASE_IMAGE}", "FROM python:3.11-slim"), "BASE_IMAGE"),
    ("source before dependencies", lambda text: text.replace("FROM ${BASE_IMAGE} AS deps\n",
                                                             "FROM ${BASE_IMAGE} AS deps\nCOPY . /app\n"), "cached"),
]


@pytest.mark.parametrize("label, mutate, message", DOCKERFILE_MISTAKES, ids=[m[0] for m in DOCKERFILE_MISTAKES])
def test_dockerfile_mistakes_are_caught(label: str, mutate, message: str) -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert cc.check_dockerfile(text) == []
    problems = cc.check_dockerfile(mutate(text))
    assert any(message in problem for problem in problems), (label, problems)


# --------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def tls(base: dict) -> dict:
    return cc.merge(base, cc.load_compose(ROOT / "docker-compose.tls.yml"))


def test_tls_variant_gives_every_service_its_own_read_only_files(tls: dict) -> None:
    assert cc.check_tls_federation(tls) == [] and cc.check_local_federation(tls) == []
    services = tls["services"]
    coordinator = cc.read_only_files(services["coordinator"])
    assert coordinator == {"/certs/ca.pem": "./certs/ca.pem", "/certs/cert.pem": "./certs/server.pem",
                           "/certs/key.pem": "./certs/server.key"}
    for name in ("client-1", "client-2", "client-3"):
        files = cc.read_only_files(services[name])
        assert (files["/certs/cert.pem"], files["/certs/key.pem"]) == (f"./certs/{name}.pem", f"./certs/{name}.key")
        assert cc.command_words(services[name]) == ["client"]          # no --allow-insecure-token
        assert cc.volume_mounts(services[name])["/cache"] == "model-cache"   # the base file's volumes survive
    assert cc.volume_mounts(services["coordinator"])["/app/runs"] == "runs"


def test_certs_dir_moves_every_certificate() -> None:
    doc = cc.merge(cc.load_compose(ROOT / "docker-compose.yml"),
                   cc.load_compose(ROOT / "docker-compose.tls.yml", {"CERTS_DIR": "/srv/pki"}))
    sources = [source for service in doc["services"].values() for source in cc.read_only_files(service).values()]
    assert len(sources) == 12 and all(source.startswith("/srv/pki/") for source in sources)


def _tls_volume(service: str, target: str, source: str, read_only: bool = True) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        volumes = doc["services"][service]["volumes"]
        volumes[:] = [v for v in volumes if not (isinstance(v, dict) and v.get("target") == target)]
        volumes.append({"type": "bind", "source": source, "target": target, "read_only": read_only})
    return mutate


TLS_MISTAKES = [
    ("key writable", _tls_volume("coordinator", "/certs/key.pem", "./certs/server.key", read_only=False),
     "TLS_KEY=/certs/key.pem is not a read-only bind mount"),
    ("CA key mounted", _tls_volume("client-2", "/certs/ca.key", "./certs/ca.key"), "mounts ca.key"),
    ("client certificates optional", _set(["services", "coordinator", "environment", "TLS_REQUIRE_CLIENT_CERT"], "0"),
     "requires client certificates"),
    ("client without a CA", _drop(["services", "client-3", "environment", "TLS_CA"]), "TLS_CA is not set"),
    ("cleartext token allowed", _set(["services", "client-1", "command"], "client --allow-insecure-token"),
     "--allow-insecure-token"),
    ("shared client certificate", _tls_volume("client-2", "/certs/cert.pem", "./certs/client-1.pem"),
     "same certificate"),
]


@pytest.mark.parametrize("label, mutate, message", TLS_MISTAKES, ids=[m[0] for m in TLS_MISTAKES])
def test_tls_mistakes_are_caught(tls: dict, label: str, mutate, message: str) -> None:
    doc = copy.deepcopy(tls)
    mutate(doc)
    problems = cc.check_tls_federation(doc)
    assert any(message in problem for problem in problems), (label, problems)


def test_a_published_coordinator_without_tls_is_caught() -> None:
    coordinator = cc.load_compose(ROOT / "docker" / "compose.coordinator.yml")
    client = cc.load_compose(ROOT / "docker" / "compose.client-gpu.yml")
    assert cc.check_host_files(coordinator, client) == []
    # certificates from a default path: compose would start (and publish the port) without CERTS_DIR
    fixed = copy.deepcopy(coordinator)
    for volume in fixed["services"]["coordinator"]["volumes"]:
        if isinstance(volume, dict):
            volume["source"] = volume["source"].replace("<CERTS_DIR required>", "./certs")
    assert any("required variable" in p for p in cc.check_host_files(fixed, client))
    # the port published in plaintext, as before
    plain = copy.deepcopy(coordinator)
    for variable in cc.TLS_FILES:
        del plain["services"]["coordinator"]["environment"][variable]
    problems = cc.check_host_files(plain, client)
    assert any("TLS_CERT is not set" in p for p in problems), problems
    remote = copy.deepcopy(client)
    remote["services"]["client"]["command"] = "client --allow-insecure-token"
    assert any("--allow-insecure-token" in p for p in cc.check_host_files(coordinator, remote))


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30, check=False).returncode == 0:
        return ["docker", "compose"]
    return None


def test_compose_itself_refuses_the_published_coordinator_without_certs_dir(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor docker compose is installed")
    env = {key: value for key, value in os.environ.items() if key not in ("CERTS_DIR", "COMPOSE_FILE")}

    def config(path: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, "-f", path, "config", "-q"], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=120, check=False)

    refused = config("docker/compose.coordinator.yml")
    assert refused.returncode != 0
    assert "set CERTS_DIR to the folder make certs wrote" in refused.stderr
    assert config("docker/compose.coordinator.yml", CERTS_DIR=str(tmp_path)).returncode == 0
    remote = config("docker/compose.client-gpu.yml", COORDINATOR="coord.example:50051", CLIENT_NAME="gpu-a-0")
    assert remote.returncode != 0 and "set CERTS_DIR" in remote.stderr
