#!/bin/sh
# lb container entrypoint: on first start (an empty certificate volume), generate a local CA
# and a server certificate for the names in LB_CERT_HOSTS (default "localhost 127.0.0.1"),
# then exec lb with the container's arguments. Copy ca.crt out of the volume to trust it.
set -eu
dir=/var/lib/scaleout/certs
if [ ! -s "$dir/server.pem" ]; then
  hosts=""
  for h in ${LB_CERT_HOSTS:-localhost 127.0.0.1}; do hosts="$hosts --host $h"; done
  # One --host per name: word splitting of $hosts is intended.
  # shellcheck disable=SC2086
  lb certs generate --out "$dir" $hosts >&2
fi
exec lb "$@"
