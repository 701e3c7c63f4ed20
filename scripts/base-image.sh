#!/usr/bin/env bash
# The Python base image of the build tests, made here from Debian packages (no Docker Hub):
# a minimal Debian bookworm root filesystem with python3, pip and venv (debootstrap, from the
# same Debian mirror as this machine's apt sources), imported into the engine as
#   127.0.0.1:5000/base/python:3.11-slim
# and pushed to the open registry. Build jobs in the tests use it through
#   build.base_image_template: "127.0.0.1:5000/base/python:{python}-slim"
# Idempotent: does nothing when the registry already holds the image.
set -euo pipefail

REGISTRY=${IW_BASE_REGISTRY:-127.0.0.1:5000}
IMAGE="$REGISTRY/base/python:3.11-slim"
STATE=${IW_DEV_STATE:-/var/tmp/image-worker-dev}

log() { printf '[base-image] %s\n' "$*" >&2; }

if curl -fs -o /dev/null \
  -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
  "http://$REGISTRY/v2/base/python/manifests/3.11-slim"; then
  # Present in the registry; make sure the engine has it too (tests build FROM it).
  docker image inspect "$IMAGE" >/dev/null 2>&1 || docker pull -q "$IMAGE" >/dev/null
  exit 0
fi

# The mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org.
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | grep -E '^[[:space:]]*(URIs:|deb[[:space:]])' | grep -oE 'https?://[^ ]+/debian/?' \
  | grep -v -- '-security' | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}

if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

root="$STATE/base-python-rootfs"
rm -rf "$root"
mkdir -p "$STATE"
log "debootstrap bookworm (python3, pip, venv) from $mirror"
started=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv \
  bookworm "$root" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
  || { tail -n 30 "$STATE/debootstrap.log" >&2; exit 1; }
# Slim it: package lists and caches are not needed in a base image.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
  "$root"/usr/share/man/* "$root"/usr/share/locale/*
log "importing into the engine as $IMAGE"
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV LANG=C.UTF-8' \
  -c 'CMD ["python3"]' - "$IMAGE" >/dev/null
rm -rf "$root"
docker push -q "$IMAGE" >/dev/null
log "pushed $IMAGE in $(( $(date +%s) - started )) s"
