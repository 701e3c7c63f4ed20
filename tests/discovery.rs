//! Discovery against the real Docker engine and the fixture images of scripts/fixtures.sh:
//! both sources, compared with each other and with tests/common/expected.rs.

mod common;

use std::process::Command;
use std::sync::Once;
use std::time::Instant;

use bollard::Docker;
use bollard::query_parameters::ListContainersOptions;
use image_worker::discovery::{
    Discovery, DiscoveryError, DiscoveryOptions, JobRules, Source, discover_image,
};

use common::expected::{self, Expected, FIXTURES, fixture_image};

/// Builds the fixtures once per test binary; fast when they are up to date.
fn ensure_fixtures() {
    static FIXTURES_BUILT: Once = Once::new();
    FIXTURES_BUILT.call_once(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fixtures.sh");
        let status = Command::new(script)
            .status()
            .expect("run scripts/fixtures.sh");
        assert!(status.success(), "scripts/fixtures.sh failed: {status}");
    });
}

async fn docker() -> Docker {
    ensure_fixtures();
    Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap()
}

async fn discover(
    docker: &Docker,
    image: &str,
    source: Source,
    opts: &DiscoveryOptions,
) -> Discovery {
    let opts = DiscoveryOptions {
        source,
        ..opts.clone()
    };
    discover_image(docker, image, &opts)
        .await
        .unwrap_or_else(|e| panic!("{image} ({source}): {e:?}"))
}

/// Both sources on one image; asserts they agree and returns the layers result.
async fn discover_both(docker: &Docker, image: &str, opts: &DiscoveryOptions) -> Discovery {
    let layers = discover(docker, image, Source::Layers, opts).await;
    let archive = discover(docker, image, Source::Archive, opts).await;
    assert_eq!(layers.source, Source::Layers);
    assert_eq!(archive.source, Source::Archive);
    assert_eq!(
        Discovery {
            source: Source::Layers,
            ..archive
        },
        layers,
        "{image}: the sources disagree"
    );
    layers
}

fn assert_expected(found: &Discovery, want: &Expected) {
    let name = want.name;
    assert_eq!(found.root, want.root, "{name}: root");
    assert_eq!(found.jobs, want.jobs, "{name}: jobs");
    let files: Vec<&str> = found.manifests.iter().map(|m| m.file.as_str()).collect();
    assert_eq!(files, want.manifest_files, "{name}: manifests");
    assert_eq!(
        found.warnings.len(),
        want.warning_prefixes.len(),
        "{name}: warnings {:#?}",
        found.warnings
    );
    for (warning, prefix) in found.warnings.iter().zip(want.warning_prefixes) {
        assert!(
            warning.starts_with(prefix),
            "{name}: warning {warning:?} should start with {prefix:?}"
        );
    }
    for path in want.not_jobs {
        assert!(
            !found.jobs.iter().any(|j| j == path),
            "{name}: {path} must not be a job"
        );
    }
    assert_eq!(
        found.files_scanned, want.files_scanned,
        "{name}: files scanned"
    );
}

#[tokio::test]
async fn every_fixture_from_both_sources() {
    let docker = docker().await;
    for want in FIXTURES {
        let found = discover_both(
            &docker,
            &fixture_image(want.name),
            &DiscoveryOptions::default(),
        )
        .await;
        assert_expected(&found, want);
    }
}

#[tokio::test]
async fn basic_manifest_is_reported_in_full() {
    let docker = docker().await;
    let found = discover_both(
        &docker,
        &fixture_image("basic"),
        &DiscoveryOptions::default(),
    )
    .await;
    assert_eq!(
        serde_json::to_value(&found.manifests[0]).unwrap(),
        expected::basic_manifest()
    );
}

#[tokio::test]
async fn layered_reads_symlinks_inside_the_image_never_on_the_host() {
    let docker = docker().await;
    let found = discover_both(
        &docker,
        &fixture_image("layered"),
        &DiscoveryOptions::default(),
    )
    .await;
    for manifest in &found.manifests {
        assert_eq!(
            manifest.name,
            expected::LAYERED_SHADOW_NAME,
            "{}",
            manifest.file
        );
    }
    let report = serde_json::to_string(&found).unwrap();
    for host_file in ["/etc/shadow", "/etc/machine-id", "/etc/hostname"] {
        let Ok(content) = std::fs::read_to_string(host_file) else {
            continue;
        };
        for line in content.lines().map(str::trim).filter(|l| l.len() >= 6) {
            assert!(
                !report.contains(line),
                "host {host_file} content leaked into the report"
            );
        }
    }
}

#[tokio::test]
async fn auto_uses_the_layers_on_this_host() {
    let docker = docker().await;
    let found = discover(
        &docker,
        &fixture_image("basic"),
        Source::Auto,
        &DiscoveryOptions::default(),
    )
    .await;
    assert_eq!(found.source, Source::Layers);
    assert_eq!(found.jobs, expected::BASIC_JOBS);
}

#[tokio::test]
async fn a_missing_image_is_an_error() {
    let docker = docker().await;
    for source in [Source::Layers, Source::Archive] {
        let opts = DiscoveryOptions {
            source,
            ..Default::default()
        };
        let err = discover_image(
            &docker,
            "127.0.0.1:5000/fixtures/no-such-image:latest",
            &opts,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, DiscoveryError::ImageNotFound(_)), "{err:?}");
    }
}

#[tokio::test]
async fn the_archive_source_leaves_no_container_behind() {
    let docker = docker().await;
    // A tag of this test's own: other tests of this binary read `layered` at the same time, and
    // their containers must not change the count.
    let image = format!(
        "{}-noleak{}",
        fixture_image("layered"),
        uuid::Uuid::new_v4().simple()
    );
    let tagged = std::process::Command::new("docker")
        .args(["tag", &fixture_image("layered"), &image])
        .status()
        .unwrap();
    assert!(tagged.success());
    let count = || async {
        let opts = ListContainersOptions {
            all: true,
            ..Default::default()
        };
        let all = docker.list_containers(Some(opts)).await.unwrap();
        all.iter()
            .filter(|c| c.image.as_deref() == Some(image.as_str()))
            .count()
    };
    let before = count().await;
    discover(
        &docker,
        &image,
        Source::Archive,
        &DiscoveryOptions::default(),
    )
    .await;
    let bad_rules = DiscoveryOptions {
        rules: JobRules {
            r#match: Some("(".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(matches!(
        discover_image(
            &docker,
            &image,
            &DiscoveryOptions {
                source: Source::Archive,
                ..bad_rules
            }
        )
        .await,
        Err(DiscoveryError::InvalidRules(_))
    ));
    assert_eq!(count().await, before);
    let _ = std::process::Command::new("docker")
        .args(["rmi", &image])
        .output();
}

#[tokio::test]
async fn custom_rules_from_a_build_file() {
    let docker = docker().await;
    let rules = JobRules {
        r#match: Some("^$".into()),
        glob: vec!["tests/*_runner.py".into()],
        paths: vec![],
    };
    let found = discover_both(
        &docker,
        &fixture_image("builder"),
        &DiscoveryOptions {
            rules,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        found.jobs,
        [
            "/pyats/tests/relative_runner.py",
            "/pyats/tests/suite_runner.py",
            "/pyats/tests/unlisted_runner.py"
        ]
    );
}

#[tokio::test]
async fn oversized_manifests_are_a_warning() {
    let docker = docker().await;
    let opts = DiscoveryOptions {
        max_manifest_bytes: 64,
        ..Default::default()
    };
    let found = discover_both(&docker, &fixture_image("basic"), &opts).await;
    assert!(found.manifests.is_empty());
    assert!(
        found.warnings.iter().any(|w| w
            .starts_with("/pyats/dest/basic/basic_example_job.tem: manifest is ")
            && w.ends_with("bytes, over the 64-byte limit")),
        "{:#?}",
        found.warnings
    );
    assert_eq!(found.jobs, expected::BASIC_JOBS);
}

/// Benchmark on `fixtures/large` when `scripts/fixtures.sh --large` has built it.
#[tokio::test]
async fn large_image_timings() {
    let docker = docker().await;
    let image = fixture_image("large");
    if docker.inspect_image(&image).await.is_err() {
        eprintln!("{image} absent (scripts/fixtures.sh --large builds it); no timings");
        return;
    }
    let mut results = Vec::new();
    for source in [Source::Layers, Source::Archive] {
        let started = Instant::now();
        let found = discover(&docker, &image, source, &DiscoveryOptions::default()).await;
        eprintln!(
            "discovery of {image} with {source}: {:?} ({} files scanned)",
            started.elapsed(),
            found.files_scanned
        );
        assert_eq!(found.jobs, expected::LARGE_JOBS);
        results.push(found);
    }
    assert_eq!(
        Discovery {
            source: Source::Layers,
            ..results.pop().unwrap()
        },
        results.pop().unwrap()
    );
}
