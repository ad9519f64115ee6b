#!/usr/bin/env bash
# Run a reference configuration of the study (docs/DESIGN.md §6) on one GPU machine: the coordinator and
# one client per partition (num_clients), spread round-robin over the machine's GPUs. With at least 2 GPUs
# per client each client is a torchrun job on several GPUs (DDP), as many as keep the run's batches exact
# (scripts/rank_layout.py): e.g. RoBERTa-large's 10 clients on 20 GPUs train on 2 GPUs each, with
# gradient_accumulation_steps and max_local_steps halved so that every step and round sees the study's rows.
#
#   scripts/gpu_reference.sh configs/roberta_large_hellaswag.yaml
#   scripts/gpu_reference.sh configs/smollm_360m_hellaswag.yaml method=fedavg seed=43
#   scripts/gpu_reference.sh configs/roberta_large_hellaswag.yaml \
#       model_name=/models/roberta-large dataset=/data/hellaswag      # local copies, no hub
#
# Needs: `make setup`; CUDA; for load_in_4bit (the SmolLM config) `pip install bitsandbytes`;
# the model and HellaSwag from the hub (HF_HUB_OFFLINE unset) or local copies as above
# (a folder with train.jsonl and validation.jsonl in HellaSwag's schema).
#
# Environment: PYTHON (default .venv/bin/python), RUN_DIR (default runs/<time>-<config>),
# GPUS (how many GPUs to use; default: all that torch sees), NPROC_PER_CLIENT (GPUs per client: 1 for
# one process per client; default: chosen as above), COORDINATOR_DEVICE (where the coordinator evaluates,
# e.g. cpu; default: cuda:0), DEVICE=cpu (only to try this script itself with a tiny model on a machine
# without a GPU; NPROC_PER_CLIENT=2 then makes 2-rank CPU clients).
# Outputs: RUN_DIR/metrics.jsonl, summary.json, adapters/, logs/ (one log per process).
set -euo pipefail

cd "$(dirname "$0")/.."
CONFIG=${1:?usage: scripts/gpu_reference.sh CONFIG.yaml [key=value ...]}
shift
OVERRIDES=("$@")
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
NAME=$(basename "$CONFIG" .yaml)
RUN_DIR=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)-$NAME}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

[ -f "$CONFIG" ] || { echo "error: config $CONFIG does not exist" >&2; exit 2; }
[ -x "$PYTHON" ] || { echo "error: $PYTHON not found; run make setup (or set PYTHON)" >&2; exit 2; }

# Preflight: the configuration validates, and the machine has what it asks for. Prints "num_clients gpus
# ranks_per_client", then the overrides that keep the batches with that many ranks, then why that layout.
PREFLIGHT=$("$PYTHON" - "$CONFIG" "$DEVICE" "${GPUS:-0}" "${NPROC_PER_CLIENT:-}" "${OVERRIDES[@]}" <<'EOF'
import importlib.util, sys
import torch
from common.config import ConfigError, RunConfig, parse_overrides
from scripts.rank_layout import choose_layout

config_path, device, gpus, requested, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
try:
    config = RunConfig.load(config_path, parse_overrides(overrides))
except ConfigError as error:
    sys.exit(f"error: {error}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                 "install a CUDA build of torch, or DEVICE=cpu to try the script with a tiny model")
    gpus = min(gpus, torch.cuda.device_count()) if gpus > 0 else torch.cuda.device_count()
if config.model.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
    sys.exit("error: load_in_4bit: true needs bitsandbytes: pip install bitsandbytes (or load_in_4bit=false)")
if requested and not requested.isdigit():
    sys.exit(f"error: NPROC_PER_CLIENT={requested!r}: give a whole number of ranks per client, e.g. 2")
try:
    # DEVICE=cpu: CPU ranks, as many as asked (default 1).
    layout = choose_layout(config.train, gpus if device == "cuda" else int(requested or 1), config.data.num_clients,
                           int(requested) if requested else (None if device == "cuda" else 1))
except ValueError as error:
    sys.exit(f"error: {error}")
print(config.data.num_clients, max(gpus, 1), layout.ranks)
print(" ".join(f"{key}={value}" for key, value in layout.overrides.items()))
print(layout.note)
EOF
)
{ read -r NUM_CLIENTS NUM_GPUS NPROC; read -r LAYOUT_OVERRIDES; read -r LAYOUT_NOTE; } <<< "$PREFLIGHT"
# shellcheck disable=SC2206  # key=value words without spaces
OVERRIDES+=($LAYOUT_OVERRIDES)

mkdir -p "$RUN_DIR/logs"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "run directory $RUN_DIR: $NAME, $NUM_CLIENTS clients on $NUM_GPUS ${DEVICE} device(s); $LAYOUT_NOTE"
[ -z "$LAYOUT_OVERRIDES" ] || echo "with $NPROC ranks per client: $LAYOUT_OVERRIDES"
COORDINATOR_ARGS=()
[ -z "${COORDINATOR_DEVICE:-}" ] || COORDINATOR_ARGS=(--device "$COORDINATOR_DEVICE")
"$PYTHON" -m server --config "$CONFIG" --address 127.0.0.1:0 --run-dir "$RUN_DIR" \
    --address-file "$RUN_DIR/coordinator.address" --wait-for-clients 1800 "${COORDINATOR_ARGS[@]}" \
    "${OVERRIDES[@]}" > "$RUN_DIR/logs/coordinator.log" 2>&1 &
COORDINATOR=$!
PIDS+=("$COORDINATOR")

# The coordinator listens once it has loaded the data and its model (minutes for a large one).
while [ ! -s "$RUN_DIR/coordinator.address" ]; do
    if ! kill -0 "$COORDINATOR" 2>/dev/null; then
        echo "error: the coordinator exited early; see $RUN_DIR/logs/coordinator.log" >&2
        tail -n 20 "$RUN_DIR/logs/coordinator.log" >&2
        exit 1
    fi
    sleep 2
done
ADDRESS=$(cat "$RUN_DIR/coordinator.address")
echo "coordinator on $ADDRESS"

# GPU ids as CUDA_VISIBLE_DEVICES names them: through the caller's own CUDA_VISIBLE_DEVICES, if set.
IFS=, read -r -a VISIBLE <<< "${CUDA_VISIBLE_DEVICES:-}"
gpu_id() { if [ "${#VISIBLE[@]}" -gt 0 ]; then echo "${VISIBLE[$1]}"; else echo "$1"; fi; }

for ((i = 0; i < NUM_CLIENTS; i++)); do
    CLIENT=(--coordinator "$ADDRESS" --name "client-$i" --partition "$i" --patience 1800)
    if [ "$NPROC" -gt 1 ]; then
        # One client, NPROC ranks (torchrun, rendezvous on loopback): client i takes the (i mod groups)-th
        # group of NPROC GPUs, and its rank r trains on the r-th of them.
        env_args=()
        if [ "$DEVICE" = cuda ]; then
            first=$(( (i % (NUM_GPUS / NPROC)) * NPROC ))
            ids=$(gpu_id "$first")
            for ((r = 1; r < NPROC; r++)); do ids="$ids,$(gpu_id $((first + r)))"; done
            env_args=(CUDA_VISIBLE_DEVICES="$ids")
        fi
        env "${env_args[@]}" GLOO_SOCKET_IFNAME=lo "$PYTHON" -m torch.distributed.run --nnodes 1 \
            --nproc-per-node "$NPROC" --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 --rdzv-id "client-$i" \
            --local-addr 127.0.0.1 -m client "${CLIENT[@]}" --device "$DEVICE" \
            > "$RUN_DIR/logs/client-$i.log" 2>&1 &
    else
        if [ "$DEVICE" = cuda ]; then device="cuda:$((i % NUM_GPUS))"; else device=cpu; fi
        "$PYTHON" -m client "${CLIENT[@]}" --device "$device" > "$RUN_DIR/logs/client-$i.log" 2>&1 &
    fi
    PIDS+=("$!")
done

# One line per committed round, as the coordinator appends them.
printed=0
print_new_rounds() {
    [ -f "$RUN_DIR/metrics.jsonl" ] || return 0
    local lines
    lines=$(wc -l < "$RUN_DIR/metrics.jsonl")
    [ "$lines" -gt "$printed" ] || return 0
    sed -n "$((printed + 1)),${lines}p" "$RUN_DIR/metrics.jsonl" | "$PYTHON" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    m.setdefault("basis_overlap", None)
    m["basis_overlap"] = float("nan") if m["basis_overlap"] is None else m["basis_overlap"]
    print("round {round:>3}  acc {accuracy:.4f}  loss {loss:.4f}  overlap {basis_overlap:.5f}  "
          "{round_seconds:.1f} s".format(**m), flush=True)'
    printed=$lines
}
while kill -0 "$COORDINATOR" 2>/dev/null; do
    print_new_rounds
    sleep 5
done
print_new_rounds
status=0
wait "$COORDINATOR" || status=$?
if [ "$status" -ne 0 ]; then
    echo "error: the coordinator failed (exit $status); see $RUN_DIR/logs/coordinator.log" >&2
    exit "$status"
fi
echo "summary:"
cat "$RUN_DIR/summary.json"
echo
echo "$RUN_DIR"
