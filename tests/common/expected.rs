//! What discovery must find in each fixture image (built by scripts/fixtures.sh).

/// Job files of `fixtures/basic`, sorted.
pub const BASIC_JOBS: &[&str] = &[
    "/pyats/dest/basic/basic_example_job.py",
    "/pyats/dest/broken/broken_job.py",
    "/pyats/dest/broken/notype_job.py",
    "/pyats/dest/marked/runner.py",
];
