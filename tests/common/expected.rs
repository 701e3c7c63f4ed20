//! What discovery must find in each fixture image (built by scripts/fixtures.sh).
