#!/usr/bin/env bash
# Build the Dockerfile with Debian's podman and check that its container serves the demo behind the password,
# on a machine that reaches Debian's and PyPI's registries but no container registry (as this project's).
#
# The one stand-in: python:3.11-slim cannot be pulled, so a Debian bookworm root (debootstrap; Python 3.11, as
# the official image, which is also bookworm-based) is imported under that name.  The Dockerfile is built as is.
# On this VM podman needs runc (crun refuses hybrid cgroups) and ulimits under the host's hard limits.
# Where /opt/wheels holds a CPU torch (this machine kind), the build sees it instead of PyPI's CUDA torch.
#
#   sudo scripts/podman_check.sh        # about 10 minutes on 2 cores; removes its container, keeps the images
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=localhost/qlora-studio:check
PORT=${PORT:-17860}
PASSWORD=podman-check-password
WORK=$(mktemp -d)
trap 'podman rm -f qs-check >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

command -v podman debootstrap runc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap

if ! podman image exists localhost/python:3.11-slim; then
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/root" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log"
  ln -s python3 "$WORK/root/usr/bin/python"
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/root/etc/ssl/certs/ca-certificates.crt"  # this network's CA too
  { echo "[global]"; echo "cert = /etc/ssl/certs/ca-certificates.crt"
    [ -d /opt/wheels ] && echo "find-links = /opt/wheels"; } >"$WORK/root/etc/pip.conf"
  tar -C "$WORK/root" -c . | podman import --change 'ENV LANG=C.UTF-8' - localhost/python:3.11-slim >/dev/null
fi

VOLUMES=(); [ -d /opt/wheels ] && VOLUMES=(-v /opt/wheels:/opt/wheels:ro)
"${PODMAN[@]}" build --pull=never --network=host "${LIMITS[@]}" "${VOLUMES[@]}" -t "$IMAGE" .

# Without a password the container refuses to serve (it binds 0.0.0.0).
if "${PODMAN[@]}" run --rm "${LIMITS[@]}" "$IMAGE" >"$WORK/refused.log" 2>&1; then
  echo "FAIL: served without a password"; exit 1
fi
grep -q "without a password" "$WORK/refused.log"

"${PODMAN[@]}" run -d --name qs-check "${LIMITS[@]}" -p "$PORT:7860" -e STUDIO_PASSWORD="$PASSWORD" "$IMAGE" >/dev/null
for _ in $(seq 120); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/config" || true)
  [ "$code" != 000 ] && break; sleep 2
done
[ "$code" = 401 ] || { echo "FAIL: /config without login gave $code"; podman logs qs-check; exit 1; }
curl -sf -c "$WORK/cookies" -d "username=admin&password=$PASSWORD" "http://127.0.0.1:$PORT/login" >/dev/null
curl -sf -b "$WORK/cookies" "http://127.0.0.1:$PORT/" | grep -q '"title":"QLoRA Studio"'
[ "$(podman exec qs-check id -u)" = 1000 ]
podman exec qs-check test -d /data/qlora-studio/runs
echo "OK: $IMAGE built and its container serves the demo behind the password as uid 1000, data on /data"
