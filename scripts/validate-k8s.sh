#!/usr/bin/env bash
# Validates Kubernetes manifests against the API's JSON schemas, strictly (unknown fields are
# errors): kubernetes-validate from PyPI, which ships the schemas, so no cluster and no download
# at validation time. kubeconform and kubeval are not packaged in Debian, PyPI or crates.io.
# Installs it once into a venv under the dev state directory. Usage: validate-k8s.sh FILE...
set -euo pipefail

STATE=${IW_DEV_STATE:-/var/tmp/image-worker-dev}
VENV="$STATE/kubernetes-validate"
VERSION=1.37.0

if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$VERSION"; then
  mkdir -p "$STATE"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q "kubernetes-validate==$VERSION" >&2
fi
exec "$VENV/bin/kubernetes-validate" --strict --no-warn "$@"
