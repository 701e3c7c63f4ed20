#!/usr/bin/env bash
# Builds the fixture images that the discovery tests read, and pushes each one to both loopback
# registries as <registry>/fixtures/<name>:latest (plus :<hash>, which is how a later run knows the
# registry already holds this exact content):
#   basic, builder, workspace, layered      always
#   large                                    only with --large (≈60k files, for benchmarks)
# Idempotent and fast when nothing changed: a fixture's hash covers what decides its content, the
# generator (scripts/fixtures/generate.py, which also writes the Dockerfile) and /bin/busybox; when both registries hold that hash and the
# local image carries it as a label, the fixture is skipped. Needs scripts/services.sh up.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${IW_DEV_STATE:-/var/tmp/image-worker-dev}
WORK="$STATE/fixtures"
REG_USER=${IW_REGISTRY_USER:-iwtest}
REG_PASS=${IW_REGISTRY_PASSWORD:-iwtest-secret-pw}
OPEN=127.0.0.1:5000
AUTH=127.0.0.1:5001
LABEL=org.image-worker.fixture-hash

log() { printf '[fixtures] %s\n' "$*" >&2; }

fixtures=(basic builder workspace layered)
for arg in "$@"; do
  case "$arg" in
    --large) fixtures+=(large) ;;
    *) echo "usage: $0 [--large]" >&2; exit 64 ;;
  esac
done

inputs_hash=$(cat "$HERE/fixtures/generate.py" /bin/busybox | sha256sum | cut -c1-16)

# registry_has REGISTRY NAME TAG: does the registry serve that manifest? The password goes to curl
# on stdin, never on a command line.
registry_has() {
  local url="http://$1/v2/fixtures/$2/manifests/$3"
  local accept='Accept: application/vnd.docker.distribution.manifest.v2+json'
  if [ "$1" = "$AUTH" ]; then
    printf 'user = "%s:%s"\n' "$REG_USER" "$REG_PASS" |
      curl -fsS -o /dev/null -I -H "$accept" -K - "$url" 2>/dev/null
  else
    curl -fsS -o /dev/null -I -H "$accept" "$url" 2>/dev/null
  fi
}

quiet() { # quiet COMMAND...: its output only when it fails
  local out
  if ! out=$("$@" 2>&1); then printf '%s\n' "$out" >&2; return 1; fi
}

local_hash() { docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$1" 2>/dev/null || true; }

logged_in=0
login() {
  [ "$logged_in" = 1 ] && return 0
  printf '%s' "$REG_PASS" | quiet docker login "$AUTH" -u "$REG_USER" --password-stdin
  logged_in=1
}

push_all() { # push_all NAME HASH: the local image $OPEN/fixtures/NAME:latest to both registries
  local name=$1 hash=$2 reg tag
  login
  for reg in "$OPEN" "$AUTH"; do
    for tag in latest "$hash"; do
      docker tag "$OPEN/fixtures/$name:latest" "$reg/fixtures/$name:$tag"
      docker push -q "$reg/fixtures/$name:$tag" >/dev/null
    done
  done
}

build_one() { # build_one NAME HASH
  local name=$1 hash=$2 ctx="$WORK/$name"
  python3 "$HERE/fixtures/generate.py" "$name" "$ctx" "$hash"
  if [ "$name" = layered ]; then
    docker load -q -i "$ctx/image.tar" >/dev/null
  else
    DOCKER_BUILDKIT=0 quiet docker build -q --label "$LABEL=$hash" -t "$OPEN/fixtures/$name:latest" "$ctx"
  fi
}

mkdir -p "$WORK"
for name in "${fixtures[@]}"; do
  hash="$inputs_hash-$name"
  hash=$(printf '%s' "$hash" | sha256sum | cut -c1-16)
  ref="$OPEN/fixtures/$name:latest"
  in_registries=0
  if registry_has "$OPEN" "$name" "$hash" && registry_has "$AUTH" "$name" "$hash"; then in_registries=1; fi
  if [ "$in_registries" = 1 ] && [ "$(local_hash "$ref")" = "$hash" ]; then
    log "$name: up to date ($hash)"
    continue
  fi
  start=$SECONDS
  if [ "$in_registries" = 1 ]; then
    log "$name: pulling $hash from $OPEN"
    docker pull -q "$OPEN/fixtures/$name:$hash" >/dev/null
    docker tag "$OPEN/fixtures/$name:$hash" "$ref"
  else
    log "$name: building $hash"
    build_one "$name" "$hash"
    push_all "$name" "$hash"
  fi
  log "$name: done in $((SECONDS - start))s"
done
