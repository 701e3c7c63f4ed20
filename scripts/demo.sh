#!/usr/bin/env bash
# The main job, end to end: services up, fixture images in the local registry, a worker up,
# a real pull job submitted over AMQP, its report printed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
scripts/services.sh up
scripts/fixtures.sh
cargo build --quiet --bin image-worker
bin="${CARGO_TARGET_DIR:-target}/debug/image-worker"

mkdir -p .dev
export IMAGE_WORKER__LOGS__ROOT="$PWD/.dev/logs"
config=config/image-worker.yaml

echo "[demo] starting the worker (log: .dev/worker.log)" >&2
"$bin" run --config "$config" >.dev/worker.log 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
  grep -q "consuming" .dev/worker.log && break
  kill -0 $worker 2>/dev/null || { cat .dev/worker.log >&2; exit 1; }
  sleep 0.1
done

echo "[demo] submitting: pull 127.0.0.1:5000/fixtures/basic:latest for group demo" >&2
status=0
"$bin" submit pull --config "$config" --name fixtures/basic --tag latest \
  --push-url 127.0.0.1:5000 --group demo --wait --wait-timeout-s 300 || status=$?

echo "[demo] finished in $(( $(date +%s) - started )) s (exit $status); job logs under .dev/logs" >&2
exit $status
