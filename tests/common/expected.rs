//! What discovery must find in each fixture image (built by scripts/fixtures.sh).
//!
//! Fixtures are pushed as `<registry>/fixtures/<name>:latest` to both loopback registries and
//! kept locally as `127.0.0.1:5000/fixtures/<name>:latest`.

use serde_json::{Value, json};

pub const OPEN_REGISTRY: &str = "127.0.0.1:5000";
pub const AUTH_REGISTRY: &str = "127.0.0.1:5001";

/// `127.0.0.1:5000/fixtures/<name>:latest`.
pub fn fixture_image(name: &str) -> String {
    format!("{OPEN_REGISTRY}/fixtures/{name}:latest")
}

/// One fixture and its exact discovery result (with the default options).
pub struct Expected {
    pub name: &'static str,
    pub root: &'static str,
    pub jobs: &'static [&'static str],
    /// The `file` of every reported manifest, sorted.
    pub manifest_files: &'static [&'static str],
    /// Each warning, sorted, starts with the matching prefix (the rest is parser detail).
    pub warning_prefixes: &'static [&'static str],
    /// Files that must not be reported as jobs (skipped trees, decoys, deleted by a layer).
    pub not_jobs: &'static [&'static str],
    pub files_scanned: u64,
}

/// The fixtures built without `--large`.
pub const FIXTURES: &[&Expected] = &[&BASIC, &BUILDER, &WORKSPACE, &LAYERED];

pub const BASIC_JOBS: &[&str] = &[
    "/pyats/dest/basic/basic_example_job.py",
    "/pyats/dest/broken/broken_job.py",
    "/pyats/dest/broken/notype_job.py",
    "/pyats/dest/marked/runner.py",
];

pub const BASIC: Expected = Expected {
    name: "basic",
    root: "/pyats",
    jobs: BASIC_JOBS,
    manifest_files: &["/pyats/dest/basic/basic_example_job.tem"],
    warning_prefixes: &[
        "/pyats/dest/broken/broken_job.tem: invalid YAML: ",
        "/pyats/dest/broken/notype_job.tem: no `type`",
    ],
    not_jobs: &[
        "/pyats/dest/basic/helper_script.py",
        "/pyats/dest/basic/nomain_job.py",
        "/pyats/dest/marked/late_marker.py",
        "/pyats/lib/python3.11/site-packages/somepkg/pkg_job.py",
        "/pyats/dest/__pycache__/cached_job.py",
        "/pyats/.git/hooks/hook_job.py",
        "/pyats/installation/setup_job.py",
    ],
    files_scanned: 12,
};

/// The manifest of `basic` exactly as reported (JSON of `discovery::Manifest`).
pub fn basic_manifest() -> Value {
    let arguments = json!({"testbed-file": "/pyats/testbeds/basic.yaml", "max-failures": 2});
    json!({
        "file": "/pyats/dest/basic/basic_example_job.tem",
        "job_file": "/pyats/dest/basic/basic_example_job.py",
        "name": "basic_example",
        "description": "Basic example job",
        "tags": ["basic", "example"],
        "arguments": arguments,
        "profiles": [
            {"name": "DEFAULT", "description": "", "runtime": null, "arguments": arguments},
            {
                "name": "sanity",
                "description": "Quick sanity run",
                "runtime": "system",
                "arguments": {"testbed-file": "/pyats/testbeds/basic.yaml", "max-failures": 0},
            },
        ],
        "runtimes": {"system": {"type": "system"}},
    })
}

pub const BUILDER_JOBS: &[&str] = &[
    "/pyats/tests/regression_job.py",
    "/pyats/tests/relative_runner.py",
    "/pyats/tests/suite_runner.py",
];

pub const BUILDER: Expected = Expected {
    name: "builder",
    root: "/pyats",
    jobs: BUILDER_JOBS,
    manifest_files: &["/pyats/tests/regression_job.tem"],
    warning_prefixes: &[
        "/pyats/tests/missing_listed.py: listed as a job file but not found",
        "/pyats/tests/nomain_listed.py: listed as a job file but has no top-level `def main(`",
    ],
    not_jobs: &[
        "/pyats/tests/nomain_listed.py",
        "/pyats/tests/unlisted_runner.py",
        "/pyats/lib/python3.11/site-packages/pyats/easypy/fake_job.py",
    ],
    files_scanned: 6,
};

pub const WORKSPACE_ROOT: &str = "/other";
pub const WORKSPACE_JOBS: &[&str] = &[
    "/other/jobs/ws_job.py",
    "/other/nested/deep/dir/deep_job.py",
];

pub const WORKSPACE: Expected = Expected {
    name: "workspace",
    root: WORKSPACE_ROOT,
    jobs: WORKSPACE_JOBS,
    manifest_files: &["/other/jobs/ws_job.tem"],
    warning_prefixes: &[],
    not_jobs: &["/pyats/decoy_job.py"],
    files_scanned: 3,
};

pub const LAYERED_JOBS: &[&str] = &[
    "/pyats/a/survivor_job.py",
    "/pyats/keep/keep_job.py",
    "/pyats/link/alias_job.py",
    "/pyats/link/dangling_job.py",
    "/pyats/link/link_job.py",
    "/pyats/link/loop_job.py",
    "/pyats/link/runtime_job.py",
    "/pyats/link/up_job.py",
    "/pyats/link/vendored_job.py",
    "/pyats/olddir/new_job.py",
];

/// The name inside the image's own /etc/shadow, read through `link_job.tem` and `up_job.tem`.
pub const LAYERED_SHADOW_NAME: &str = "from-image-shadow";

pub const LAYERED: Expected = Expected {
    name: "layered",
    root: "/pyats",
    jobs: LAYERED_JOBS,
    manifest_files: &["/pyats/link/link_job.tem", "/pyats/link/up_job.tem"],
    warning_prefixes: &[
        "/pyats/link/dangling_job.tem: symlink to /etc/machine-id: not found in the image",
        "/pyats/link/loop_job.tem: symlink to loop_job.tem: more than 40 symlinks",
        "/pyats/link/runtime_job.tem: symlink to /etc/hostname: /etc/hostname is a container runtime path",
    ],
    not_jobs: &[
        "/pyats/a/deleted_job.py",
        "/pyats/olddir/old_job.py",
        "/pyats/keep/replaced_job.py",
        "/pyats/lib/python3.11/site-packages/vendored/vendored_job.py",
    ],
    files_scanned: 16,
};

/// `fixtures/large` (only with `scripts/fixtures.sh --large`): jobs under /pyats/dest.
pub const LARGE_JOBS: &[&str] = &[
    "/pyats/dest/suite0/suite0_job.py",
    "/pyats/dest/suite1/suite1_job.py",
    "/pyats/dest/suite2/suite2_job.py",
    "/pyats/dest/suite3/suite3_job.py",
    "/pyats/dest/suite4/suite4_job.py",
];
