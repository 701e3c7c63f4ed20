#!/usr/bin/env bash
# Installs (when absent) and starts (when not running) every service the demo and the tests use,
# all on loopback:
#   - the Docker engine (Debian docker.io)
#   - RabbitMQ on 127.0.0.1:5672 (Debian rabbitmq-server)
#   - an open registry on 127.0.0.1:5000 and an htpasswd (bcrypt) one on 127.0.0.1:5001
#     (Debian docker-registry, with configs written here: the package's own demands auth on :5000)
# Idempotent: run it as often as you like. `scripts/services.sh down` stops what it started.
set -euo pipefail

STATE=${IW_DEV_STATE:-/var/tmp/image-worker-dev}
REG_USER=${IW_REGISTRY_USER:-iwtest}
REG_PASS=${IW_REGISTRY_PASSWORD:-iwtest-secret-pw}

log() { printf '[services] %s\n' "$*" >&2; }

apt_updated=0
ensure_pkg() { # ensure_pkg COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  log "installing $2"
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  for _ in $(seq 1 $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "timed out waiting for $what"; return 1
}

start_docker() {
  ensure_pkg docker docker.io
  if docker info >/dev/null 2>&1; then return 0; fi
  log "starting the Docker engine"
  if ! service docker start >/dev/null 2>&1; then
    nohup dockerd >"$STATE/dockerd.log" 2>&1 &
  fi
  wait_for 60 "the Docker engine" docker info
}

start_rabbitmq() {
  ensure_pkg rabbitmq-server rabbitmq-server
  if rabbitmqctl -q status >/dev/null 2>&1; then return 0; fi
  log "starting RabbitMQ"
  mkdir -p /etc/rabbitmq
  # Loopback only. consumer_timeout stays at RabbitMQ's default; the worker handles long jobs.
  if [ ! -f /etc/rabbitmq/rabbitmq.conf ] || ! grep -q 'image-worker' /etc/rabbitmq/rabbitmq.conf; then
    cat >/etc/rabbitmq/rabbitmq.conf <<CONF
# written by image-worker scripts/services.sh
listeners.tcp.default = 127.0.0.1:5672
loopback_users.guest = true
CONF
  fi
  # The Debian wrapper drops to the rabbitmq user itself.
  nohup rabbitmq-server >"$STATE/rabbitmq.log" 2>&1 &
  wait_for 20 "the RabbitMQ node" rabbitmqctl -q status || true
  rabbitmqctl -q await_startup --timeout 120
}

write_registry_config() { # write_registry_config PORT [AUTH]
  local port=$1 auth=${2:-} cfg="$STATE/registry-$1.yml"
  {
    echo "version: 0.1"
    echo "log: {level: warn}"
    echo "storage:"
    echo "  filesystem: {rootdirectory: $STATE/registry-$port-data}"
    echo "  delete: {enabled: true}"
    echo "http:"
    echo "  addr: 127.0.0.1:$port"
    if [ -n "$auth" ]; then
      echo "auth:"
      echo "  htpasswd: {realm: image-worker-test, path: $STATE/htpasswd}"
    fi
  } >"$cfg"
  echo "$cfg"
}

start_registry() { # start_registry PORT [AUTH]
  local port=$1 auth=${2:-}
  ensure_pkg docker-registry docker-registry
  if curl -s -o /dev/null "http://127.0.0.1:$port/v2/"; then return 0; fi
  log "starting the registry on 127.0.0.1:$port${auth:+ (basic auth)}"
  local cfg; cfg=$(write_registry_config "$port" "$auth")
  nohup docker-registry serve "$cfg" >"$STATE/registry-$port.log" 2>&1 &
  echo $! >"$STATE/registry-$port.pid"
  wait_for 20 "the registry on :$port" curl -s -o /dev/null "http://127.0.0.1:$port/v2/"
}

up() {
  mkdir -p "$STATE"
  ensure_pkg curl curl
  ensure_pkg htpasswd apache2-utils
  ensure_pkg busybox busybox-static
  if [ ! -f "$STATE/htpasswd" ] || ! htpasswd -vb "$STATE/htpasswd" "$REG_USER" "$REG_PASS" >/dev/null 2>&1; then
    htpasswd -Bbc "$STATE/htpasswd" "$REG_USER" "$REG_PASS" >/dev/null 2>&1
  fi
  start_docker
  start_rabbitmq
  start_registry 5000
  start_registry 5001 auth
  log "up: docker, rabbitmq 127.0.0.1:5672, registries 127.0.0.1:5000 (open) and :5001 (auth)"
}

down() {
  for port in 5000 5001; do
    if [ -f "$STATE/registry-$port.pid" ]; then
      kill "$(cat "$STATE/registry-$port.pid")" 2>/dev/null || true
      rm -f "$STATE/registry-$port.pid"
    fi
  done
  rabbitmqctl -q stop >/dev/null 2>&1 || true
  log "down"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 [up|down]" >&2; exit 64 ;;
esac
