#!/usr/bin/env bash
# Development certificates for TLS and mutual TLS: a CA, a coordinator certificate and client certificates.
#   scripts/make_certs.sh [OUT_DIR] [SERVER_NAMES] [CLIENTS]
# SERVER_NAMES: comma-separated DNS names / IPs the coordinator is reached by (default: localhost,127.0.0.1,::1,coordinator)
# CLIENTS:      a number N (client-0 .. client-N-1; default 4: client-0 for the local examples, client-1..3 for
#               docker-compose.tls.yml's services) or comma-separated names (gpu-a-0,gpu-a-1): NAME.pem/NAME.key each
# KEY_UID (environment): also let this user id read the coordinator and client keys (not ca.key), for a
#               container that runs as another user than the one who owns the files (the image's user `app` is
#               uid 10001): a POSIX ACL entry (setfacl) where available, else chown (root only); no one else gains
#               access (group and others stay without any).
# The coordinator's certificate is valid for serverAuth and clientAuth: the container health probe
# (docker/healthcheck.py) presents it when the coordinator requires client certificates.
# Not for production: keys are unencrypted and valid for 365 days.
set -euo pipefail
out=${1:-certs}
names=${2:-localhost,127.0.0.1,::1,coordinator}
clients=${3:-4}
key_uid=${KEY_UID:-}
[[ -z $key_uid || $key_uid =~ ^[0-9]+$ ]] || { echo "KEY_UID must be a numeric user id, got '$key_uid'" >&2; exit 2; }

if [[ $clients =~ ^[0-9]+$ ]]; then
  client_names=()
  for ((i = 0; i < clients; i++)); do client_names+=("client-$i"); done
else
  IFS=',' read -ra client_names <<< "$clients"
fi
for name in "${client_names[@]}"; do
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ && $name != ca && $name != server ]] \
    || { echo "client certificate name '$name': use letters, digits, '.', '_' and '-' (not ca or server)" >&2; exit 2; }
done

mkdir -p "$out"
cd "$out"

san=""
IFS=',' read -ra parts <<< "$names"
for name in "${parts[@]}"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
san=${san%,}

rm -f ca.key
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=subspacefl dev CA" \
  -keyout ca.key -out ca.pem -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() {  # issue NAME SUBJECT_CN EXTENSIONS
  rm -f "$1.key"   # a fresh file: no owner or ACL left from an earlier run
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server coordinator "subjectAltName=$san
extendedKeyUsage=serverAuth,clientAuth"
for name in "${client_names[@]}"; do
  issue "$name" "$name" "extendedKeyUsage=clientAuth"
done
chmod 600 ./*.key
chmod 644 ./*.pem

granted=""
if [[ -n $key_uid ]]; then
  for name in server "${client_names[@]}"; do
    if command -v setfacl > /dev/null && setfacl -m "u:$key_uid:r" "$name.key" 2>/dev/null; then
      how="a POSIX ACL entry u:$key_uid:r; group and others still none"
    elif [[ $(id -u) == 0 ]]; then
      chown "$key_uid" "$name.key"
      how="now owned by uid $key_uid, mode 600"
    else
      echo "KEY_UID=$key_uid: cannot grant read access to $out/$name.key: install setfacl (package acl)," \
        "or run as root (chown)" >&2
      exit 1
    fi
  done
  granted="; the coordinator and client keys readable by uid $key_uid ($how), ca.key not"
fi
echo "wrote $(pwd): ca.pem, server.pem/.key (for $names), $(IFS=,; echo "${client_names[*]}" | sed 's/,/, /g')" \
  "(.pem/.key)$granted"
