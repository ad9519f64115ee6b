"""Static check of the Docker files: what `make docker-test` proves on a real engine, read from the files.

    python scripts/check_compose.py [--root DIR]

It reads docker-compose.yml (alone and merged with docker-compose.gpu.yml or with
docker-compose.tls.yml), the per-host files docker/compose.coordinator.yml and docker/compose.client-gpu.yml,
docker/Dockerfile and .dockerignore, and checks the structure the README promises:
one image for every role, a coordinator with a health check and the run outputs on
a volume, clients that start once the coordinator is healthy and restart on failure,
num_clients matching the client services, the model cache on a volume, in the GPU
variant each client's GPUs by device id: one, or NPROC_PER_CLIENT for a client that runs
as a torchrun job (DEVICE=cuda, started so by docker/entrypoint.sh); mutual TLS in the TLS variant and in
the per-host files (TLS_CA, TLS_CERT and TLS_KEY on read-only bind mounts, never ca.key, client certificates
required, each client its own certificate, no cleartext token), and the published port refused without
certificates (${CERTS_DIR:?...}). Needs only Python and PyYAML; exits 1 and lists every problem found.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNS_TARGET = "/app/runs"
CACHE_TARGET = "/cache"
HEALTHY = "service_healthy"
RESTART_POLICIES = ("on-failure", "always", "unless-stopped")

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


# --------------------------------------------------------------------------- loading
def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$) on every string."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        if op in (":-", ":?") and not current:
            current = None
        if current is not None:
            return current
        if op in ("-", ":-"):
            return arg
        return f"<{name} required>" if op in ("?", ":?") else ""

    return _VARIABLE.sub(substitute, value)


def load_compose(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The file as compose reads it: YAML (anchors and merge keys resolved), variables substituted."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return interpolate(data, env or {})


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`docker compose -f base -f override`, for what these checks read: mappings merge, volumes merge by their
    container path, other values replace."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key == "environment" and key in merged:
            merged[key] = {**environment(merged), **environment({"environment": value})}
        elif key == "volumes" and isinstance(value, list) and isinstance(merged.get(key), list):
            by_target = {_volume_target(entry): entry for entry in merged[key]}
            by_target.update({_volume_target(entry): copy.deepcopy(entry) for entry in value})
            merged[key] = list(by_target.values())
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --------------------------------------------------------------------------- service accessors
def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_words(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(word) for word in command]


def role(service: dict[str, Any]) -> str:
    words = command_words(service)
    return words[0] if words else ""


def overrides(service: dict[str, Any]) -> dict[str, str]:
    return dict(word.split("=", 1) for word in command_words(service)[1:] if "=" in word)


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (volume name or host path), short and long syntax alike."""
    mounts = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) >= 2:
                mounts[parts[1]] = parts[0]
        elif isinstance(entry, dict) and "target" in entry:
            mounts[entry["target"]] = entry.get("source", "")
    return mounts


def _volume_target(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("target", ""))
    parts = str(entry).split(":")
    return parts[1] if len(parts) >= 2 else parts[0]


def read_only_files(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of the read-only bind mounts (short syntax `:ro`, long `read_only: true`)."""
    mounts = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) >= 3 and "ro" in parts[2].split(","):
                mounts[parts[1]] = parts[0]
        elif isinstance(entry, dict) and entry.get("type") == "bind" and entry.get("read_only") is True:
            mounts[str(entry.get("target", ""))] = str(entry.get("source", ""))
    return mounts


def service_networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or []
    return set(networks if isinstance(networks, list) else networks.keys())


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {})
    return [device for device in reservations.get("devices") or []
            if "gpu" in (device.get("capabilities") or [])]


def restart_ok(service: dict[str, Any]) -> bool:
    policy = str(service.get("restart", "no"))
    return policy.split(":", 1)[0] in RESTART_POLICIES


# --------------------------------------------------------------------------- checks
def check_volume(doc: dict[str, Any], name: str, service: dict[str, Any], target: str, what: str) -> list[str]:
    source = volume_mounts(service).get(target)
    if source is None:
        return [f"service {name}: no volume at {target} ({what})"]
    if source not in (doc.get("volumes") or {}):
        return [f"service {name}: {target} comes from {source!r}, not a named volume declared under top-level volumes:"]
    return []


def check_coordinator(doc: dict[str, Any], name: str, service: dict[str, Any], dockerfile_health: bool) -> list[str]:
    problems = []
    if role(service) != "coordinator":
        problems.append(f"service {name}: command must start with 'coordinator' (docker/entrypoint.sh), "
                        f"got {service.get('command')!r}")
    if not service.get("healthcheck") and not dockerfile_health:
        problems.append(f"service {name}: no healthcheck (compose or Dockerfile); clients cannot wait for it")
    if (service.get("healthcheck") or {}).get("disable"):
        problems.append(f"service {name}: healthcheck disabled; clients wait for service_healthy")
    if str(service.get("restart", "no")) != "no":
        problems.append(f"service {name}: restart {service.get('restart')!r} would start a finished run over; "
                        "use 'no'")
    problems += check_volume(doc, name, service, RUNS_TARGET, "run outputs")
    problems += check_volume(doc, name, service, CACHE_TARGET, "model cache")
    return problems


def check_client(doc: dict[str, Any], name: str, service: dict[str, Any], coordinator: str) -> list[str]:
    problems = []
    depends = service.get("depends_on") or {}
    condition = depends.get(coordinator, {}).get("condition") if isinstance(depends, dict) else None
    if condition != HEALTHY:
        problems.append(f"service {name}: depends_on {coordinator} needs condition: {HEALTHY} (got {condition!r})")
    if not restart_ok(service):
        problems.append(f"service {name}: restart {service.get('restart', 'no')!r}; use on-failure[:N] so a "
                        "crashed client rejoins")
    target = environment(service).get("COORDINATOR", "")
    if target.rsplit(":", 1)[0] != coordinator:
        problems.append(f"service {name}: COORDINATOR={target!r} should dial {coordinator}:<port>")
    if not environment(service).get("CLIENT_NAME"):
        problems.append(f"service {name}: no CLIENT_NAME; a restarted client must rejoin under the same name")
    problems += check_volume(doc, name, service, CACHE_TARGET, "model cache")
    return problems


def check_local_federation(doc: dict[str, Any], dockerfile_health: bool = True,
                           expected_clients: int | None = 3) -> list[str]:
    """docker-compose.yml: a coordinator and its clients on one project network, health-gated, on volumes."""
    services = doc.get("services") or {}
    coordinators = [name for name, service in services.items() if role(service) == "coordinator"]
    clients = sorted(name for name, service in services.items() if role(service) == "client")
    if len(coordinators) != 1:
        return [f"expected exactly one service whose command starts with 'coordinator', found {coordinators}"]
    coordinator = coordinators[0]
    problems = check_coordinator(doc, coordinator, services[coordinator], dockerfile_health)
    if expected_clients is not None and len(clients) != expected_clients:
        problems.append(f"expected {expected_clients} client services, found {len(clients)}: {clients}")
    if not clients:
        return problems + ["no client services (command: client)"]
    num_clients = overrides(services[coordinator]).get("num_clients")
    if num_clients != str(len(clients)):
        problems.append(f"coordinator: num_clients={num_clients} but there are {len(clients)} client services; "
                        "the coordinator would wait forever")
    for key, variable in (("method", "METHOD"), ("num_rounds", "ROUNDS"), ("model_name", "MODEL")):
        if key not in overrides(services[coordinator]):
            problems.append(f"coordinator: no {key}=${{{variable}:-...}} in its command")
    names = [environment(services[name]).get("CLIENT_NAME") for name in clients]
    if len(set(names)) != len(names):
        problems.append(f"client names repeat: {names}")
    for name in clients:
        problems += check_client(doc, name, services[name], coordinator)
    images = {services[name].get("image") for name in [coordinator, *clients]}
    if len(images) != 1 or None in images:
        problems.append(f"all roles must run one image; found {sorted(map(str, images))}")
    declared = set(doc.get("networks") or {})
    shared = set.intersection(*(service_networks(services[name]) for name in [coordinator, *clients]))
    if not shared & declared:
        problems.append(f"coordinator and clients share no declared project network (declared: {sorted(declared)})")
    build = services[coordinator].get("build") or {}
    if not isinstance(build, dict) or build.get("dockerfile") != "docker/Dockerfile" or \
            "BASE_IMAGE" not in (build.get("args") or {}):
        problems.append("coordinator: build must use docker/Dockerfile with the BASE_IMAGE build argument")
    return problems


def ranks_per_client(service: dict[str, Any]) -> int | None:
    """NPROC_PER_CLIENT (docker/entrypoint.sh: the client as a torchrun job of that many ranks); None if invalid."""
    text = environment(service).get("NPROC_PER_CLIENT", "") or "1"
    return int(text) if text.isdigit() and int(text) >= 1 else None


def check_gpu_clients(doc: dict[str, Any], client_names: list[str]) -> list[str]:
    """Each client's GPUs reserved by device id (one, or one per torchrun rank), distinct ids across clients,
    and the client's device set to them."""
    problems, seen = [], {}
    services = doc.get("services") or {}
    for name in client_names:
        service = services.get(name) or {}
        devices = gpu_devices(service)
        if not devices:
            problems.append(f"service {name}: no deploy.resources.reservations.devices entry with capabilities [gpu]")
            continue
        ranks = ranks_per_client(service)
        if ranks is None:
            problems.append(f"service {name}: NPROC_PER_CLIENT={environment(service)['NPROC_PER_CLIENT']!r}; "
                            f"give the number of torchrun ranks (GPUs) of this client, e.g. 2")
            continue
        ids = [str(i) for device in devices for i in device.get("device_ids") or []]
        if len(ids) != ranks:
            problems.append(f"service {name}: reserve exactly {ranks} GPU(s) by device_ids, one per rank "
                            f"(NPROC_PER_CLIENT={ranks}), got {ids}")
        if any(device.get("count") is not None for device in devices):
            problems.append(f"service {name}: use device_ids, not count (count and device_ids exclude each other)")
        for gpu in ids:
            if gpu in seen:
                problems.append(f"services {seen[gpu]} and {name} reserve the same GPU {gpu}")
            seen[gpu] = name
        device = environment(service).get("DEVICE", "")
        if ranks == 1 and not device.startswith("cuda"):
            problems.append(f"service {name}: DEVICE={device!r}; a GPU client trains on cuda:N")
        if ranks > 1 and device != "cuda":
            problems.append(f"service {name}: DEVICE={device!r} with NPROC_PER_CLIENT={ranks}; use DEVICE=cuda "
                            f"(under torchrun rank r trains on cuda:r)")
    return problems


def check_entrypoint(text: str) -> list[str]:
    """docker/entrypoint.sh starts a client with NPROC_PER_CLIENT > 1 as a torchrun job."""
    if "NPROC_PER_CLIENT" in text and "torch.distributed.run" in text:
        return []
    return ["docker/entrypoint.sh: the client role must start NPROC_PER_CLIENT > 1 with python -m "
            "torch.distributed.run (torchrun)"]


TLS_FILES = ("TLS_CA", "TLS_CERT", "TLS_KEY")
REQUIRED = re.compile(r"<(?P<name>[A-Za-z_][A-Za-z0-9_]*) required>")   # interpolate()'s mark of an unset ${X:?}


def check_tls(name: str, service: dict[str, Any], coordinator: bool) -> list[str]:
    """Mutual TLS in one service: TLS_CA, TLS_CERT and TLS_KEY (docker/entrypoint.sh) name files that are
    read-only bind mounts, never the CA's key; a coordinator requires client certificates; a client does not
    send its token in cleartext."""
    problems = []
    env, files = environment(service), read_only_files(service)
    for variable in TLS_FILES:
        path = env.get(variable, "")
        if not path:
            problems.append(f"service {name}: {variable} is not set (docker/entrypoint.sh passes it as "
                            f"--{variable.lower().replace('_', '-')})")
        elif path not in files:
            problems.append(f"service {name}: {variable}={path} is not a read-only bind mount (`:ro` or "
                            "read_only: true)")
    if any(Path(source).name == "ca.key" for source in files.values()):
        problems.append(f"service {name}: mounts ca.key; the CA's key signs certificates and stays on the host")
    if coordinator and env.get("TLS_REQUIRE_CLIENT_CERT", "1") not in ("1", "true", "yes"):
        problems.append(f"service {name}: TLS_REQUIRE_CLIENT_CERT={env['TLS_REQUIRE_CLIENT_CERT']!r}; mutual TLS "
                        "requires client certificates (1)")
    if not coordinator and "--allow-insecure-token" in command_words(service):
        problems.append(f"service {name}: --allow-insecure-token with TLS; drop it, the token travels encrypted")
    return problems


def check_tls_federation(doc: dict[str, Any]) -> list[str]:
    """docker-compose.yml + docker-compose.tls.yml: every service on mutual TLS, each client with its own
    certificate, the coordinator's health check not switched off (it speaks TLS)."""
    services = doc.get("services") or {}
    problems = []
    owners: dict[str, str] = {}
    for name, service in services.items():
        kind = role(service)
        if kind not in ("coordinator", "client"):
            continue
        problems += check_tls(name, service, kind == "coordinator")
        if kind == "client":
            source = read_only_files(service).get(environment(service).get("TLS_CERT", ""))
            if source and source in owners:
                problems.append(f"services {owners[source]} and {name} present the same certificate {source}; "
                                "give each client its own (make certs: client-1..3)")
            if source:
                owners[source] = name
    return problems


def check_host_files(coordinator_doc: dict[str, Any], client_doc: dict[str, Any],
                     dockerfile_health: bool = True) -> list[str]:
    """docker/compose.coordinator.yml, docker/compose.client-gpu.yml: coordinator and GPU clients on their own hosts."""
    problems = []
    coordinators = {n: s for n, s in (coordinator_doc.get("services") or {}).items() if role(s) == "coordinator"}
    if len(coordinators) != 1:
        problems.append(f"docker/compose.coordinator.yml: expected one coordinator service, found {list(coordinators)}")
    for name, service in coordinators.items():
        problems += [f"docker/compose.coordinator.yml: {p}"
                     for p in check_coordinator(coordinator_doc, name, service, dockerfile_health)]
        if not any(str(port).split(":")[-1].split("/")[0] == "50051" for port in service.get("ports") or []):
            problems.append("docker/compose.coordinator.yml: publish port 50051 for the remote clients")
        # A published port carries the token and the adapters: mutual TLS, and compose refuses to start
        # without the certificates (${CERTS_DIR:?...} in the mounts).
        problems += [f"docker/compose.coordinator.yml: {p}" for p in check_tls(name, service, coordinator=True)]
        problems += [f"docker/compose.coordinator.yml: {p}" for p in check_tls_required(name, service)]
    clients = {n: s for n, s in (client_doc.get("services") or {}).items() if role(s) == "client"}
    if not clients:
        problems.append("docker/compose.client-gpu.yml: no client service")
    for name, service in clients.items():
        if not restart_ok(service):
            problems.append(f"docker/compose.client-gpu.yml: service {name}: no restart policy (on-failure[:N])")
        if not environment(service).get("COORDINATOR"):
            problems.append(f"docker/compose.client-gpu.yml: service {name}: COORDINATOR is not set")
        problems += [f"docker/compose.client-gpu.yml: {p}" for p in check_gpu_clients(client_doc, [name])]
        problems += [f"docker/compose.client-gpu.yml: {p}" for p in check_tls(name, service, coordinator=False)]
        problems += [f"docker/compose.client-gpu.yml: {p}" for p in check_tls_required(name, service)]
        problems += [f"docker/compose.client-gpu.yml: {p}"
                     for p in check_volume(client_doc, name, service, CACHE_TARGET, "model cache")]
    return problems


def check_tls_required(name: str, service: dict[str, Any]) -> list[str]:
    """Read from the file interpolated without any variable set: every TLS file's mount must come from a
    required variable (${CERTS_DIR:?...}), so that compose refuses to start without certificates."""
    files = read_only_files(service)
    unset = [variable for variable in TLS_FILES
             if not REQUIRED.search(files.get(environment(service).get(variable, ""), ""))]
    if unset:
        return [(f"service {name}: the files of {', '.join(unset)} do not come from a required variable "
                 "(${CERTS_DIR:?...}): without it compose would start without TLS")]
    return []


def check_dockerfile(text: str) -> list[str]:
    """One image: base as a build argument, dependencies before the source, non-root, health check, entrypoint."""
    problems = []
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()
             if line.strip() and not line.strip().startswith("#")]
    upper = [line.split(None, 1)[0].upper() for line in lines]
    first_from = upper.index("FROM") if "FROM" in upper else len(lines)
    if not any(line.startswith("ARG BASE_IMAGE") for line in lines[:first_from]):
        problems.append("Dockerfile: declare ARG BASE_IMAGE=... before the first FROM")
    if not any(re.match(r"FROM \$\{?BASE_IMAGE\}?", line) for line in lines):
        problems.append("Dockerfile: FROM ${BASE_IMAGE}")
    requirements = next((i for i, line in enumerate(lines) if upper[i] == "COPY" and "requirements.txt" in line), None)
    source = next((i for i, line in enumerate(lines) if re.match(r"COPY\s+(--\S+\s+)*\.\s", line)), None)
    install = next((i for i, line in enumerate(lines) if upper[i] == "RUN" and "pip install" in line), None)
    if requirements is None or source is None or install is None or not requirements < install < source:
        problems.append("Dockerfile: COPY requirements.txt, RUN pip install, then COPY . (a cached dependency layer)")
    users = [line.split(None, 1)[1] for line, word in zip(lines, upper) if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("Dockerfile: the final USER must be a non-root user")
    if "HEALTHCHECK" not in upper:
        problems.append("Dockerfile: no HEALTHCHECK")
    if not any(word == "ENTRYPOINT" and "entrypoint.sh" in line for line, word in zip(lines, upper)):
        problems.append("Dockerfile: ENTRYPOINT docker/entrypoint.sh (the command decides the role)")
    return problems


def check_dockerignore(text: str) -> list[str]:
    patterns = {line.strip().rstrip("/") for line in text.splitlines() if line.strip() and not line.startswith("#")}
    return [f".dockerignore: add {needed}" for needed in (".git", ".venv", "runs", "docker/.build", "certs")
            if needed not in patterns]


def check_repository(root: Path = ROOT) -> list[str]:
    dockerfile = root / "docker" / "Dockerfile"
    problems = check_dockerfile(dockerfile.read_text())
    has_health = "HEALTHCHECK" in dockerfile.read_text()
    problems += check_dockerignore((root / ".dockerignore").read_text())
    problems += check_entrypoint((root / "docker" / "entrypoint.sh").read_text())
    base = load_compose(root / "docker-compose.yml")
    problems += [f"docker-compose.yml: {p}" for p in check_local_federation(base, has_health)]
    gpu = merge(base, load_compose(root / "docker-compose.gpu.yml"))
    clients = sorted(n for n, s in (gpu.get("services") or {}).items() if role(s) == "client")
    problems += [f"docker-compose.gpu.yml: {p}" for p in check_gpu_clients(gpu, clients)]
    problems += [f"docker-compose.gpu.yml (merged): {p}" for p in check_local_federation(gpu, has_health)]
    tls = merge(base, load_compose(root / "docker-compose.tls.yml"))
    problems += [f"docker-compose.tls.yml (merged): {p}" for p in check_local_federation(tls, has_health)]
    problems += [f"docker-compose.tls.yml (merged): {p}" for p in check_tls_federation(tls)]
    problems += check_host_files(load_compose(root / "docker" / "compose.coordinator.yml"),
                                 load_compose(root / "docker" / "compose.client-gpu.yml"), has_health)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    problems = check_repository(args.root)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("docker files OK: docker-compose.yml (+ docker-compose.gpu.yml, + docker-compose.tls.yml), "
          "docker/compose.coordinator.yml, docker/compose.client-gpu.yml, docker/Dockerfile, .dockerignore")
    return 0


if __name__ == "__main__":
    sys.exit(main())
