#!/usr/bin/env bash
# Development certificates for TLS and mutual TLS: a CA, a coordinator certificate and client certificates.
#   scripts/make_certs.sh [OUT_DIR] [SERVER_NAMES] [CLIENTS]
# SERVER_NAMES: comma-separated DNS names / IPs the coordinator is reached by (default: localhost,127.0.0.1,::1,coordinator)
# CLIENTS:      number of client certificates (default: 3)
# Not for production: keys are unencrypted and valid for 365 days.
set -euo pipefail
out=${1:-certs}
names=${2:-localhost,127.0.0.1,::1,coordinator}
clients=${3:-3}
mkdir -p "$out"
cd "$out"

san=""
IFS=',' read -ra parts <<< "$names"
for name in "${parts[@]}"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
san=${san%,}

openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=subspacefl dev CA" \
  -keyout ca.key -out ca.pem -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() {  # issue NAME SUBJECT_CN EXTENSIONS
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server coordinator "subjectAltName=$san
extendedKeyUsage=serverAuth"
for ((i = 0; i < clients; i++)); do
  issue "client-$i" "client-$i" "extendedKeyUsage=clientAuth"
done
chmod 600 ./*.key
echo "wrote $(pwd): ca.pem, server.pem/.key (for $names), client-0..$((clients - 1)).pem/.key"
