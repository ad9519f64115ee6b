#!/bin/sh
# One image, two roles: the first word of the command decides.
#
#   coordinator [key=value ...]   python -m server, listening on 0.0.0.0:$PORT (default 50051) with the
#                                 run configuration $CONFIG (default configs/minilm_bbc.yaml); outputs go to
#                                 $RUN_DIR, or to /app/runs/<time>-<method>/ when RUN_DIR is empty
#   client [option ...]           python -m client, dialling $COORDINATOR (default coordinator:50051)
#                                 as $CLIENT_NAME (default: the hostname) on $DEVICE (default cpu);
#                                 with NPROC_PER_CLIENT=N > 1 one client as a torchrun job of N ranks
#                                 (DEVICE=cuda: rank r on cuda:r; rank 0 alone talks to the coordinator)
#   anything else                 run as given: python -m server --help, python -c ..., bash
#
# exec hands PID 1 to Python, so `docker stop` (SIGTERM) reaches the coordinator's shutdown handler.
set -eu

case "${1:-}" in
    coordinator)
        shift
        if [ -n "${RUN_DIR:-}" ]; then
            set -- --run-dir "$RUN_DIR" "$@"
        fi
        exec python -m server --config "${CONFIG:-configs/minilm_bbc.yaml}" --address "0.0.0.0:${PORT:-50051}" "$@"
        ;;
    client)
        shift
        set -- --coordinator "${COORDINATOR:-coordinator:50051}" --name "${CLIENT_NAME:-$(hostname)}" \
            --device "${DEVICE:-cpu}" "$@"
        if [ "${NPROC_PER_CLIENT:-1}" -gt 1 ]; then
            # torchrun's agent is PID 1: docker stop reaches it, and it stops the ranks.
            exec python -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_CLIENT" -m client "$@"
        fi
        exec python -m client "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
