#!/usr/bin/env bash
# Run an experiment grid (default: the reference study's, configs/grid_reference.yaml) on one GPU
# machine: cell after cell, each a local federation whose clients are spread round-robin over the
# GPUs found (client i on cuda:(i mod #GPUs), the launcher's --devices), then the report.
#
#   scripts/grid_gpu.sh                                         # configs/grid_reference.yaml, all GPUs
#   scripts/grid_gpu.sh configs/grid_reference.yaml --only model=roberta-large --only seed=42
#   GPUS=2 scripts/grid_gpu.sh                                  # only cuda:0 and cuda:1
#   scripts/grid_gpu.sh configs/grid_reference.yaml --dry-run   # what would run, and each command
#
# Needs: `make setup` with a CUDA build of torch; bitsandbytes for the SmolLM (4-bit) cells; the models
# and HellaSwag from the hub (HF_HUB_OFFLINE unset) or local copies named in the grid's overrides.
# Environment: PYTHON (default .venv/bin/python), GPUS (how many to use; default all).
# Rerun the same command after an interruption: finished cells are skipped.
set -euo pipefail

cd "$(dirname "$0")/.."
GRID=configs/grid_reference.yaml
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    GRID=$1
    shift
fi
PYTHON=${PYTHON:-.venv/bin/python}
[ -f "$GRID" ] || { echo "error: grid file $GRID does not exist" >&2; exit 2; }
[ -x "$PYTHON" ] || { echo "error: $PYTHON not found; run make setup (or set PYTHON)" >&2; exit 2; }

# nvidia-smi lists the GPUs without importing torch; torch's count is the fallback (and the truth
# for what the clients can use, e.g. under CUDA_VISIBLE_DEVICES).
FOUND=0
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] || ! command -v nvidia-smi > /dev/null; then
    FOUND=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
else
    FOUND=$(nvidia-smi -L | grep -c '^GPU ' || true)
fi
if [ "$FOUND" -lt 1 ]; then
    echo "error: no GPU found (nvidia-smi -L / torch.cuda.device_count()); on a CPU machine use" \
         "make experiment GRID=configs/grid_cpu.yaml" >&2
    exit 2
fi
USE=${GPUS:-$FOUND}
[ "$USE" -le "$FOUND" ] || { echo "error: GPUS=$USE but only $FOUND GPU(s) found" >&2; exit 2; }

DEVICES=cuda:0
for ((i = 1; i < USE; i++)); do DEVICES="$DEVICES,cuda:$i"; done
if ! "$PYTHON" -c 'import bitsandbytes' 2> /dev/null; then
    echo "warning: bitsandbytes is not installed; cells with load_in_4bit: true (SmolLM-360M) will fail" \
         "(pip install bitsandbytes)" >&2
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
echo "grid $GRID: clients spread over $DEVICES"
exec "$PYTHON" -m experiments --grid "$GRID" --devices "$DEVICES" "$@"
