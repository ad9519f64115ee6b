#!/usr/bin/env bash
# Run a reference configuration of the study (docs/DESIGN.md §6) on one GPU machine: the coordinator and
# one client process per partition (num_clients), spread round-robin over the machine's GPUs.
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
# GPUS (how many GPUs to use; default: all that torch sees), DEVICE=cpu (only to try this
# script itself with a tiny model on a machine without a GPU).
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

# Preflight: the configuration validates, and the machine has what it asks for. Prints "num_clients gpus".
PREFLIGHT=$("$PYTHON" - "$CONFIG" "$DEVICE" "${GPUS:-0}" "${OVERRIDES[@]}" <<'EOF'
import importlib.util, sys
import torch
from common.config import ConfigError, RunConfig, parse_overrides

config_path, device, gpus, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
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
print(config.data.num_clients, max(gpus, 1))
EOF
)
read -r NUM_CLIENTS NUM_GPUS <<< "$PREFLIGHT"

mkdir -p "$RUN_DIR/logs"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "run directory $RUN_DIR: $NAME, $NUM_CLIENTS clients on $NUM_GPUS ${DEVICE} device(s)"
"$PYTHON" -m server --config "$CONFIG" --address 127.0.0.1:0 --run-dir "$RUN_DIR" \
    --address-file "$RUN_DIR/coordinator.address" --wait-for-clients 1800 "${OVERRIDES[@]}" \
    > "$RUN_DIR/logs/coordinator.log" 2>&1 &
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

for ((i = 0; i < NUM_CLIENTS; i++)); do
    if [ "$DEVICE" = cuda ]; then device="cuda:$((i % NUM_GPUS))"; else device=cpu; fi
    "$PYTHON" -m client --coordinator "$ADDRESS" --name "client-$i" --partition "$i" --device "$device" \
        --patience 1800 > "$RUN_DIR/logs/client-$i.log" 2>&1 &
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
