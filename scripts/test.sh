#!/usr/bin/env bash
# The whole test suite, against the real services: installs and starts them (scripts/services.sh),
# builds and pushes the fixture images (scripts/fixtures.sh) and the Python base image of the
# build tests (scripts/base-image.sh), then runs every unit and end-to-end
# test with cargo. Idempotent; safe on a fresh machine and on a warm one.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
scripts/services.sh up
scripts/base-image.sh
scripts/fixtures.sh
echo "[test] services and fixtures ready in $(( $(date +%s) - started )) s" >&2

# The tests start their own workers; setup already ran above.
export IW_SKIP_SETUP=1
cargo test --all-targets --no-fail-fast -- --test-threads="${IW_TEST_THREADS:-4}"
echo "[test] done in $(( $(date +%s) - started )) s" >&2
