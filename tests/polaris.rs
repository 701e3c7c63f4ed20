//! polaris_build jobs end to end: a real git repository (a local bare one, as the configured
//! polaris repository), the worker's mirror cache, the engine's legacy builder, the registry.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::builds::*;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(600);

const DOCKERFILE: &str = "FROM 127.0.0.1:5000/base/python:3.11-slim\n\
ARG GIT_REF\n\
ARG BASE_REF\n\
ENV WORKSPACE=/pyats\n\
COPY . /pyats/\n\
RUN echo \"$GIT_REF|$BASE_REF\" > /pyats/build-refs.txt\n";

/// The polaris repository: `main` (which moves on after `feature` and `conflict` branch off),
/// `feature` (adds a file), `conflict` (changes the line `main` also changes).
fn polaris_repository(dir: &Path) -> PathBuf {
    let work = dir.join("work");
    let bare = dir.join("polaris.git");
    commit_files(
        &work,
        &bare,
        "main",
        &[
            ("docker/Dockerfile", DOCKERFILE),
            ("shared.txt", "base\n"),
            ("jobs/polaris_job.py", "def main(runtime):\n    pass\n"),
        ],
        "base",
    );
    commit_files(
        &work,
        &bare,
        "feature",
        &[("feature.txt", "feature\n")],
        "feature",
    );
    git(&work, &["checkout", "-q", "main"]);
    commit_files(
        &work,
        &bare,
        "conflict",
        &[("shared.txt", "from conflict\n")],
        "conflict",
    );
    git(&work, &["checkout", "-q", "main"]);
    commit_files(
        &work,
        &bare,
        "main",
        &[("shared.txt", "from main\n"), ("main-only.txt", "main\n")],
        "main moves",
    );
    bare
}

fn polaris_job(git_ref: &str, base_ref: Option<&str>) -> Value {
    let mut job = json!({
        "uuid": new_uuid(),
        "type": "polaris_build",
        "group": "Polaris-Team",
        "name": "polaris",
        "tag": unique("t"),
        "git_ref": git_ref,
    });
    if let Some(b) = base_ref {
        job["base_ref"] = json!(b);
    }
    job
}

struct Setup {
    dir: PathBuf,
    state: PathBuf,
    worker: Worker,
    broker: Broker,
}

async fn setup_polaris() -> Setup {
    let dir = temp_dir("iw-polaris");
    let bare = polaris_repository(&dir);
    let state = dir.join("state");
    let extra = format!(
        "polaris:\n  repository: file://{}\n  dockerfile: docker/Dockerfile\n  push_url: {OPEN_REGISTRY}/polaris\n  state_dir: {}\n",
        bare.display(),
        state.display()
    );
    let worker = Worker::start(WorkerOptions {
        extra_yaml: format!("{}{extra}", build_worker_yaml(&[], "")),
        ..Default::default()
    });
    let broker = Broker::connect(&worker.prefix).await;
    Setup {
        dir,
        state,
        worker,
        broker,
    }
}

async fn run(setup: &mut Setup, job: &Value) -> (Value, String) {
    setup.broker.publish_job_to("polaris_image", job).await;
    let report = setup
        .broker
        .wait_reply(job["uuid"].as_str().unwrap(), WAIT)
        .await;
    let log =
        std::fs::read_to_string(Path::new(report["logs_dir"].as_str().unwrap()).join("job.log"))
            .unwrap();
    (report, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polaris_build_of_a_ref_then_from_the_cached_mirror() {
    let mut s = setup_polaris().await;
    let job = polaris_job("feature", None);
    let (report, log) = run(&mut s, &job).await;
    assert_eq!(report["status"], "successful", "{report:#}\n{log}");
    assert_eq!(report["type"], "polaris");
    assert_eq!(report["job_type"], "polaris_build");
    assert_eq!(
        report["push_url"],
        format!("{OPEN_REGISTRY}/polaris/polaris-team").as_str()
    );
    let image = format!(
        "{OPEN_REGISTRY}/polaris/polaris-team/polaris:{}",
        job["tag"].as_str().unwrap()
    );
    assert_eq!(report["image"], image.as_str());
    assert!(report["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_seed_shape(&report);
    assert_eq!(
        docker_run(&image, &["cat", "/pyats/build-refs.txt"]),
        "feature|"
    );
    assert_eq!(
        docker_run(&image, &["cat", "/pyats/feature.txt"]),
        "feature"
    );
    assert_eq!(docker_run(&image, &["cat", "/pyats/shared.txt"]), "base");
    assert!(!docker_run(&image, &["ls", "-a", "/pyats"]).contains(".git"));
    assert!(log.contains("no cached mirror yet: cloning"), "{log}");
    assert_eq!(report["data"]["git_commit"].as_str().unwrap().len(), 40);

    // The mirror is kept; the second job fetches into it and never clones again.
    let mirrors: Vec<PathBuf> = std::fs::read_dir(s.state.join("mirrors"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(mirrors.len(), 1, "{mirrors:?}");
    std::fs::write(mirrors[0].join("iw-test-marker"), "kept").unwrap();
    let (again, log) = run(&mut s, &polaris_job("main", None)).await;
    assert_eq!(again["status"], "successful", "{again:#}\n{log}");
    assert!(log.contains("into the cached mirror"), "{log}");
    assert!(!log.contains("cloning"), "{log}");
    assert_eq!(
        std::fs::read_to_string(mirrors[0].join("iw-test-marker")).unwrap(),
        "kept"
    );
    let image = again["image"].as_str().unwrap();
    assert_eq!(
        docker_run(image, &["cat", "/pyats/shared.txt"]),
        "from main"
    );
    assert_eq!(
        docker_run(image, &["cat", "/pyats/build-refs.txt"]),
        "main|"
    );
    // Discovery of the built image (needs the real discovery module).
    assert_eq!(
        again["jobs"],
        json!(["/pyats/jobs/polaris_job.py"]),
        "{again:#}"
    );
    drop(s.worker);
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polaris_build_merges_git_ref_onto_base_ref() {
    let mut s = setup_polaris().await;
    let (report, log) = run(&mut s, &polaris_job("feature", Some("main"))).await;
    assert_eq!(report["status"], "successful", "{report:#}\n{log}");
    let image = report["image"].as_str().unwrap();
    assert_eq!(
        docker_run(image, &["cat", "/pyats/build-refs.txt"]),
        "feature|main"
    );
    assert_eq!(docker_run(image, &["cat", "/pyats/feature.txt"]), "feature");
    assert_eq!(docker_run(image, &["cat", "/pyats/main-only.txt"]), "main");
    assert_eq!(
        docker_run(image, &["cat", "/pyats/shared.txt"]),
        "from main"
    );
    assert!(log.contains("merging feature"), "{log}");
    assert_eq!(report["data"]["merge_commit"].as_str().unwrap().len(), 40);
    assert_ne!(report["data"]["merge_commit"], report["data"]["git_commit"]);
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polaris_merge_conflict_and_unknown_ref_fail() {
    let mut s = setup_polaris().await;
    let (report, log) = run(&mut s, &polaris_job("conflict", Some("main"))).await;
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_eq!(report["error"]["kind"], "merge_conflict", "{log}");
    assert_eq!(
        report["error"]["message"],
        "merging conflict onto main conflicts in: shared.txt"
    );
    assert_eq!(report["error"]["retryable"], false);

    let (report, _) = run(&mut s, &polaris_job("no-such-branch", None)).await;
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_eq!(report["error"]["kind"], "not_found");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-branch is not a branch, tag or commit")
    );

    let (report, _) = run(&mut s, &polaris_job("feature", Some("no-such-base"))).await;
    assert_eq!(report["error"]["kind"], "not_found", "{report:#}");

    let (report, _) = run(&mut s, &polaris_job("--upload-pack=touch /tmp/x", None)).await;
    assert_eq!(report["error"]["kind"], "invalid_job", "{report:#}");
    let _ = std::fs::remove_dir_all(&s.dir);
}
