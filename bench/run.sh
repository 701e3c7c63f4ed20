#!/usr/bin/env bash
# The benchmark suite: brings up the services and fixtures (the large image included), builds
# the worker and the load generator in release mode, then runs bench/bench.py, which prints
# Markdown tables of medians and ratios measured side by side in this run.
#   bench/run.sh                       every section (about 25 minutes on 2 cores)
#   bench/run.sh discovery startup     some: discovery pull build throughput scaleout memory startup
# IW_BENCH_RUNS=N runs per measurement (default 5); IW_BENCH_OUT=FILE also appends the tables there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh up
scripts/base-image.sh
scripts/fixtures.sh --large
cargo build --release --quiet --bin image-worker --example jobload
exec python3 bench/bench.py "$@"
