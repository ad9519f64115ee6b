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
# TLS and the token, for both roles (files mounted into the container; empty means unset):
#   TLS_CERT, TLS_KEY             coordinator: its certificate and key (--tls-cert/--tls-key: TLS);
#                                 client: its own certificate and key, for mutual TLS
#   TLS_CA                        the development CA (make certs). Coordinator: --tls-ca, i.e. client
#                                 certificates required (mutual TLS) unless TLS_REQUIRE_CLIENT_CERT=0; the
#                                 health probe (docker/healthcheck.py) verifies the coordinator with it, so a
#                                 coordinator with TLS_CERT needs it. Client: --tls-ca (TLS to the coordinator)
#   TOKEN_FILE                    --token-file: the shared token from a file (SUBSPACEFL_TOKEN, read by
#                                 Python from the environment, works too); never put on the command line
#
# exec hands PID 1 to Python, so `docker stop` (SIGTERM) reaches the coordinator's shutdown handler.
set -eu

# Bind-mounted keys keep their host owner and mode: say how to fix an unreadable one before Python fails on it.
readable() {
    for file in "$@"; do
        if [ -n "$file" ] && [ ! -r "$file" ]; then
            echo "entrypoint: $file is missing or not readable by this container's user (uid $(id -u)):" \
                "on the host, \`make certs KEY_UID=$(id -u)\` issues keys that uid may read (README, \"TLS in Docker\")" >&2
            exit 2
        fi
    done
}

case "${1:-}" in
    coordinator)
        shift
        if [ -n "${RUN_DIR:-}" ]; then
            set -- --run-dir "$RUN_DIR" "$@"
        fi
        if [ -n "${TLS_CERT:-}${TLS_KEY:-}${TLS_CA:-}" ]; then
            if [ -z "${TLS_CA:-}" ]; then
                echo "entrypoint: TLS_CERT without TLS_CA: set TLS_CA to the CA that signed TLS_CERT (make certs:" \
                    "ca.pem); the health probe verifies the coordinator with it (TLS_REQUIRE_CLIENT_CERT=0 keeps" \
                    "client certificates optional)" >&2
                exit 2
            fi
            readable "${TLS_CERT:-}" "${TLS_KEY:-}" "$TLS_CA"
            set -- --tls-cert "${TLS_CERT:-}" --tls-key "${TLS_KEY:-}" "$@"
            case "${TLS_REQUIRE_CLIENT_CERT:-1}" in
                1|true|yes) set -- --tls-ca "$TLS_CA" "$@" ;;
                0|false|no) ;;
                *) echo "entrypoint: TLS_REQUIRE_CLIENT_CERT=$TLS_REQUIRE_CLIENT_CERT: use 1 or 0" >&2; exit 2 ;;
            esac
        fi
        if [ -n "${TOKEN_FILE:-}" ]; then
            set -- --token-file "$TOKEN_FILE" "$@"
        fi
        exec python -m server --config "${CONFIG:-configs/minilm_bbc.yaml}" --address "0.0.0.0:${PORT:-50051}" "$@"
        ;;
    client)
        shift
        # Flags from the environment go before the command's own options, which therefore win.
        readable "${TLS_CA:-}" "${TLS_CERT:-}" "${TLS_KEY:-}"
        if [ -n "${TOKEN_FILE:-}" ]; then
            set -- --token-file "$TOKEN_FILE" "$@"
        fi
        if [ -n "${TLS_CERT:-}${TLS_KEY:-}" ]; then
            set -- --tls-cert "${TLS_CERT:-}" --tls-key "${TLS_KEY:-}" "$@"
        fi
        if [ -n "${TLS_CA:-}" ]; then
            set -- --tls-ca "$TLS_CA" "$@"
        fi
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
