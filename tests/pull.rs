//! Pull jobs end to end: a real worker process, RabbitMQ, the Docker engine and the registries.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

fn assert_basic_discovery(report: &Value) {
    let jobs: Vec<&str> = report["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j.as_str().unwrap())
        .collect();
    assert_eq!(jobs, expected::BASIC_JOBS);
    let manifests = report["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    let m = &manifests[0];
    assert_eq!(m["file"], "/pyats/dest/basic/basic_example_job.tem");
    assert_eq!(m["job_file"], "/pyats/dest/basic/basic_example_job.py");
    assert_eq!(m["name"], "basic_example");
    assert_eq!(m["description"], "Basic example job");
    assert_eq!(m["tags"], json!(["basic", "example"]));
    assert_eq!(m["arguments"]["testbed-file"], "/pyats/testbeds/basic.yaml");
    assert_eq!(m["arguments"]["max-failures"], 2);
    let profiles = m["profiles"].as_array().unwrap();
    assert_eq!(profiles[0]["name"], "DEFAULT");
    assert_eq!(profiles[0]["arguments"]["max-failures"], 2);
    assert_eq!(profiles[1]["name"], "sanity");
    assert_eq!(profiles[1]["arguments"]["max-failures"], 0);
    assert!(m["runtimes"].get("system").is_some(), "{}", m["runtimes"]);
    let warnings: Vec<&str> = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("/pyats/dest/broken/broken_job.tem")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("/pyats/dest/broken/notype_job.tem")),
        "{warnings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_job_over_amqp_reports_the_seed_record() {
    let worker = Worker::start(WorkerOptions::default());
    let mut broker = Broker::connect(&worker.prefix).await;
    let job = pull_job("basic");
    let uuid = job["uuid"].as_str().unwrap().to_string();
    broker.publish_job(&job).await;
    let report = broker.wait_reply(&uuid, WAIT).await;

    assert_eq!(report["status"], "successful", "{report:#}");
    assert_eq!(report["uuid"], uuid.as_str());
    assert_eq!(report["type"], "pyats");
    assert_eq!(report["custom"], false);
    assert_eq!(report["name"], "fixtures/basic");
    assert_eq!(report["tag"], "latest");
    assert_eq!(report["group"], "testers");
    assert_eq!(report["push_url"], OPEN_REGISTRY);
    assert_seed_shape(&report);
    assert_eq!(report["image_id"], image_id(&fixture("basic")).as_str());
    assert!(report["size"].as_i64().unwrap() > 0);
    assert!(report["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(report["error"], Value::Null);
    assert_basic_discovery(&report);

    // The worker block is filled, and the same in meta.
    let w = &report["worker"];
    assert_eq!(w, &report["meta"]["worker"]);
    assert!(!w["app_label"].as_str().unwrap().is_empty());
    assert!(uuid::Uuid::parse_str(w["worker_id"].as_str().unwrap()).is_ok());
    assert_eq!(w["site"], "TEST");
    assert_eq!(w["bldg"], "TEST-1");
    assert_eq!(w["group"], "general");
    assert_eq!(w["caps"], json!(["image", "polaris_image", "pyats"]));
    let insert_time = w["insert_time"].as_str().unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(insert_time, "%Y-%m-%dT%H:%M:%S%.6fZ").is_ok(),
        "{insert_time}"
    );
    let created = report["date_created"].as_str().unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(created, "%Y-%m-%d %H:%M:%S").is_ok(),
        "{created}"
    );

    // logs_dir: <root>/<YYYY>/<MM>/images/<uuid>, holding the whole log and the report.
    let logs_dir = std::path::PathBuf::from(report["logs_dir"].as_str().unwrap());
    let now = chrono::Utc::now();
    assert_eq!(
        logs_dir,
        worker
            .logs_root
            .join(now.format("%Y/%m").to_string())
            .join("images")
            .join(&uuid)
    );
    let job_log = std::fs::read_to_string(logs_dir.join("job.log")).unwrap();
    assert!(
        job_log.contains("pulling 127.0.0.1:5000/fixtures/basic:latest"),
        "{job_log}"
    );
    assert!(job_log.contains("job successful"), "{job_log}");
    assert!(report["logs"].as_str().unwrap().contains("job successful"));
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(logs_dir.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(on_disk, report);

    // The job's data is echoed, its token masked.
    assert_eq!(report["data"]["submitter"], "tests");
    assert_eq!(report["data"]["automation_token"], "********");
    assert_eq!(report["data"]["default_credential"], true);

    // Events: running phases, then the final event on job.pull.successful.
    broker.drain_events(Duration::from_millis(1500)).await;
    let keys = broker.seen_keys();
    assert!(keys.contains(&"job.pull.running".to_string()), "{keys:?}");
    assert!(
        keys.contains(&"job.pull.successful".to_string()),
        "{keys:?}"
    );
    assert!(keys.contains(&"worker.heartbeat".to_string()), "{keys:?}");
    let phases: Vec<String> = broker
        .seen
        .iter()
        .filter(|(k, _)| k == "job.pull.running")
        .map(|(_, b)| {
            serde_json::from_slice::<Value>(b).unwrap()["phase"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        phases.contains(&"pulling".to_string()) && phases.contains(&"discovering".to_string()),
        "{phases:?}"
    );
    let final_event: Value = broker
        .seen
        .iter()
        .find(|(k, _)| k == "job.pull.successful")
        .map(|(_, b)| serde_json::from_slice(b).unwrap())
        .unwrap();
    assert_eq!(final_event, report);
    assert!(
        !String::from_utf8_lossy(
            &broker
                .seen
                .iter()
                .flat_map(|(_, b)| b.clone())
                .collect::<Vec<u8>>()
        )
        .contains("not-a-real-token-but-secret")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_registry_right_and_wrong_credentials() {
    let worker = Worker::start(WorkerOptions::default());
    let mut broker = Broker::connect(&worker.prefix).await;
    let auth_job = |password: Option<&str>| {
        let mut job = pull_job("basic");
        job["push_url"] = json!(AUTH_REGISTRY);
        if let Some(p) = password {
            job["username"] = json!(REG_USER);
            job["password"] = json!(p);
        }
        job
    };
    let wrong_password = "wrong-Pa55word-for-test";

    let good = auth_job(Some(REG_PASS));
    broker.publish_job(&good).await;
    let ok = broker
        .wait_reply(good["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(ok["status"], "successful", "{ok:#}");
    assert_eq!(ok["data"]["password"], "********");
    assert_eq!(ok["data"]["default_credential"], false);
    assert_basic_discovery(&ok);

    let bad = auth_job(Some(wrong_password));
    broker.publish_job(&bad).await;
    let failed = broker.wait_reply(bad["uuid"].as_str().unwrap(), WAIT).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(failed["error"]["kind"], "auth", "{failed:#}");
    assert_eq!(failed["error"]["retryable"], false);
    assert_seed_shape(&failed);

    let none = auth_job(None);
    broker.publish_job(&none).await;
    let refused = broker
        .wait_reply(none["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(refused["error"]["kind"], "auth", "{refused:#}");

    // No password anywhere: worker log, events, replies, files under logs_dir.
    broker.drain_events(Duration::from_millis(300)).await;
    let mut leaks = Vec::new();
    for secret in [REG_PASS, wrong_password] {
        if worker.log_text().contains(secret) {
            leaks.push(format!("worker log holds {secret}"));
        }
        for (key, body) in &broker.seen {
            if String::from_utf8_lossy(body).contains(secret) {
                leaks.push(format!("message {key} holds {secret}"));
            }
        }
        for (path, text) in files_under(&worker.logs_root) {
            if text.contains(secret) {
                leaks.push(format!("{} holds {secret}", path.display()));
            }
        }
    }
    assert!(leaks.is_empty(), "{leaks:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_outcome_and_the_worker_goes_on() {
    let worker = Worker::start(WorkerOptions::default());
    let mut broker = Broker::connect(&worker.prefix).await;

    // Not JSON, and JSON of the wrong shape: dead-lettered with a reason.
    broker
        .publish_raw("general", b"this is not json {", "x1")
        .await;
    let (body, reason) = broker
        .get_dead(Duration::from_secs(30))
        .await
        .expect("dead letter");
    assert_eq!(body, b"this is not json {");
    assert!(reason.starts_with("message is not JSON"), "{reason}");
    broker.publish_raw("general", b"[1, 2, 3]", "x2").await;
    let (_, reason) = broker
        .get_dead(Duration::from_secs(30))
        .await
        .expect("dead letter");
    assert_eq!(reason, "message is JSON but not an object");
    broker
        .publish_raw(
            "general",
            br#"{"type": "pull", "name": "x", "password": "dead-letter-pw"}"#,
            "x3",
        )
        .await;
    let (body, reason) = broker
        .get_dead(Duration::from_secs(30))
        .await
        .expect("dead letter");
    assert!(reason.contains("uuid"), "{reason}");
    // Kept for the operator, but never with a password in it.
    let kept: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        kept,
        json!({"type": "pull", "name": "x", "password": "********"})
    );
    broker
        .publish_raw(
            "general",
            format!(r#"{{"uuid": "{}", "type": "erase"}}"#, new_uuid()).as_bytes(),
            "x4",
        )
        .await;
    let (_, reason) = broker
        .get_dead(Duration::from_secs(30))
        .await
        .expect("dead letter");
    assert!(reason.contains("\"erase\" is not one of"), "{reason}");

    // A malformed image name: failed report, invalid_job.
    let mut malformed = pull_job("basic");
    malformed["name"] = json!("Bad/../Name;rm -rf");
    broker.publish_job(&malformed).await;
    let r = broker
        .wait_reply(malformed["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r["status"], "failed");
    assert_eq!(r["error"]["kind"], "invalid_job");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a valid repository name"),
        "{r:#}"
    );
    assert_seed_shape(&r);

    // A missing image: failed report, not_found.
    let missing = pull_job("does-not-exist");
    broker.publish_job(&missing).await;
    let r = broker
        .wait_reply(missing["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r["status"], "failed");
    assert_eq!(r["error"]["kind"], "not_found", "{r:#}");

    // An unreachable registry: failed, retryable, a different kind.
    let mut unreachable = pull_job("basic");
    unreachable["push_url"] = json!("127.0.0.1:5999/fixtures");
    unreachable["name"] = json!("basic");
    broker.publish_job(&unreachable).await;
    let r = broker
        .wait_reply(unreachable["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r["error"]["kind"], "registry_unreachable", "{r:#}");
    assert_eq!(r["error"]["retryable"], true);

    // An uppercase uuid is valid and comes back exactly as sent.
    let mut upper = pull_job("basic");
    let upper_uuid = new_uuid().to_uppercase();
    upper["uuid"] = json!(upper_uuid);
    broker.publish_job(&upper).await;
    let r = broker.wait_reply(&upper_uuid, WAIT).await;
    assert_eq!(r["uuid"], upper_uuid.as_str());
    assert!(r["logs_dir"].as_str().unwrap().ends_with(&upper_uuid));

    // The worker still serves the next job.
    let good = pull_job("basic");
    broker.publish_job(&good).await;
    let r = broker
        .wait_reply(good["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r["status"], "successful", "{r:#}");
    assert_eq!(
        r["jobs"].as_array().unwrap().len(),
        expected::BASIC_JOBS.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_routed_with_another_cap_fail_without_running() {
    let worker = Worker::start(WorkerOptions::default());
    let mut broker = Broker::connect(&worker.prefix).await;
    let prefix = &worker.prefix;

    // A pull on the polaris_image queue: named, not pulled.
    let pull = pull_job("basic");
    let uuid = pull["uuid"].as_str().unwrap();
    broker.publish_job_to("polaris_image", &pull).await;
    let r = broker.wait_reply(uuid, WAIT).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["error"]["kind"], "invalid_job");
    assert_eq!(r["error"]["retryable"], false);
    assert_eq!(
        r["error"]["message"],
        format!(
            "a pull job needs cap image but came from queue {prefix}.jobs.polaris_image.general \
             (cap polaris_image): publish it with routing key image.<pool>"
        )
        .as_str()
    );
    assert_eq!(r["image_id"], Value::Null);
    assert_eq!(r["jobs"], json!([]));
    assert_seed_shape(&r);
    assert!(!r["logs"].as_str().unwrap().contains("pulling"), "{r:#}");

    // A polaris_build on the image queue never reaches the polaris code.
    let polaris_uuid = new_uuid();
    let polaris = json!({
        "uuid": polaris_uuid, "type": "polaris_build", "group": "testers",
        "name": "polaris", "tag": "pr-1", "git_ref": "main",
    });
    broker.publish_job(&polaris).await;
    let r = broker.wait_reply(&polaris_uuid, WAIT).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["type"], "polaris");
    assert_eq!(r["error"]["kind"], "invalid_job");
    assert_eq!(
        r["error"]["message"],
        format!(
            "a polaris_build job needs cap polaris_image but came from queue \
             {prefix}.jobs.image.general (cap image): publish it with routing key \
             polaris_image.<pool>"
        )
        .as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_job_delivered_again_is_answered_from_its_report() {
    let worker = Worker::start(WorkerOptions::default());
    let mut broker = Broker::connect(&worker.prefix).await;
    let job = pull_job("basic");
    let uuid = job["uuid"].as_str().unwrap().to_string();
    broker.publish_job(&job).await;
    let first = broker.wait_reply(&uuid, WAIT).await;
    assert_eq!(first["status"], "successful", "{first:#}");
    assert_eq!(first["redelivered"], false);

    // Back as an expired lease comes back (x-death): answered, not run again.
    broker.publish_dead_lettered_copy(&job).await;
    let again = broker.wait_reply(&uuid, WAIT).await;
    assert_eq!(again["redelivered"], true, "{again:#}");
    assert_eq!(again["status"], "successful");
    assert_eq!(again["started_at"], first["started_at"]);
    assert_eq!(again["finished_at"], first["finished_at"]);
    assert_eq!(again["image_id"], first["image_id"]);
    assert_eq!(again["data"]["automation_token"], "********");
    let logs_dir = std::path::PathBuf::from(first["logs_dir"].as_str().unwrap());
    let job_log = std::fs::read_to_string(logs_dir.join("job.log")).unwrap();
    assert_eq!(job_log.matches("job successful").count(), 1, "{job_log}");
    assert!(
        worker
            .log_text()
            .contains("redelivered job was already reported"),
        "{}",
        worker.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_version_uses_the_cache_and_false_pulls_again() {
    let worker = Worker::start(WorkerOptions::default());
    let mut broker = Broker::connect(&worker.prefix).await;
    // A tag of our own, first pointing at `basic`, later moved to `workspace` in the registry.
    let tag = unique("pin");
    let target = format!("{OPEN_REGISTRY}/fixtures/pinned:{tag}");
    docker(&["tag", &fixture("basic"), &target]);
    docker(&["push", &target]);
    docker(&["rmi", &target]);
    let job = |pin: bool| {
        let mut j = pull_job("basic");
        j["name"] = json!("fixtures/pinned");
        j["tag"] = json!(tag);
        j["pin_version"] = json!(pin);
        j
    };
    let first = job(false);
    broker.publish_job(&first).await;
    let r1 = broker
        .wait_reply(first["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r1["status"], "successful", "{r1:#}");
    assert_eq!(r1["image_id"], image_id(&fixture("basic")).as_str());

    // Move the tag in the registry to another image, leaving the old one cached here.
    docker(&["tag", &fixture("workspace"), &target]);
    docker(&["push", &target]);
    docker(&["tag", &fixture("basic"), &target]);

    let pinned = job(true);
    broker.publish_job(&pinned).await;
    let r2 = broker
        .wait_reply(pinned["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r2["status"], "successful", "{r2:#}");
    assert_eq!(
        r2["image_id"], r1["image_id"],
        "pin_version: true must use the cached image"
    );
    assert!(
        r2["logs"].as_str().unwrap().contains("not pulling"),
        "{}",
        r2["logs"]
    );

    let unpinned = job(false);
    broker.publish_job(&unpinned).await;
    let r3 = broker
        .wait_reply(unpinned["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r3["status"], "successful", "{r3:#}");
    assert_eq!(
        r3["image_id"],
        image_id(&fixture("workspace")).as_str(),
        "pin_version: false must pull again"
    );
    assert!(
        r3["logs"].as_str().unwrap().contains("pulling"),
        "{}",
        r3["logs"]
    );
    let _ = std::process::Command::new("docker")
        .args(["rmi", &target])
        .output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_push_reports_the_mirror_namespace() {
    let worker = Worker::start(WorkerOptions {
        extra_yaml: format!(
            "registry:\n  mirror: {AUTH_REGISTRY}\n  credentials:\n    \"{AUTH_REGISTRY}\":\n      username: {REG_USER}\n      password: {REG_PASS}\n"
        ),
        ..Default::default()
    });
    let mut broker = Broker::connect(&worker.prefix).await;
    let mut job = pull_job("basic");
    job["group"] = json!("mirrorgroup");
    broker.publish_job(&job).await;
    let r = broker.wait_reply(job["uuid"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "successful", "{r:#}");
    assert_eq!(r["push_url"], format!("{AUTH_REGISTRY}/mirrorgroup"));
    assert_eq!(
        r["image"],
        format!("{AUTH_REGISTRY}/mirrorgroup/fixtures/basic:latest")
    );
    let digest = r["digest"].as_str().unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    // The mirror really holds it: its manifest digest matches.
    let out = std::process::Command::new("curl")
        .args([
            "-sf",
            "-u",
            &format!("{REG_USER}:{REG_PASS}"),
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-H",
            "Accept: application/vnd.docker.distribution.manifest.v2+json",
            &format!("http://{AUTH_REGISTRY}/v2/mirrorgroup/fixtures/basic/manifests/latest"),
        ])
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        headers.contains(&format!("docker-content-digest: {digest}")),
        "{headers}"
    );
    assert!(!worker.log_text().contains(REG_PASS));
    for (path, text) in files_under(&worker.logs_root) {
        assert!(
            !text.contains(REG_PASS),
            "{} holds the password",
            path.display()
        );
    }
}

#[test]
fn job_command_gives_the_same_report_without_a_broker() {
    setup();
    let dir = std::env::temp_dir().join(unique("iw-jobcmd"));
    std::fs::create_dir_all(&dir).unwrap();
    let job = pull_job("basic");
    let file = dir.join("job.json");
    std::fs::write(&file, job.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-worker"))
        .args(["job"])
        .arg(&file)
        .env("IMAGE_WORKER__LOGS__ROOT", dir.join("logs"))
        .env(
            "IMAGE_WORKER__AMQP__URL",
            "amqp://nobody:nothing@127.0.0.1:1/%2f",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "successful");
    assert_eq!(report["uuid"], job["uuid"]);
    assert_seed_shape(&report);
    assert_basic_discovery(&report);
    assert_eq!(report["image_id"], image_id(&fixture("basic")).as_str());

    // An engine that does not answer: still a report, failed with engine_unavailable.
    std::fs::write(&file, pull_job("basic").to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-worker"))
        .args(["job"])
        .arg(&file)
        .env("IMAGE_WORKER__LOGS__ROOT", dir.join("logs"))
        .env(
            "IMAGE_WORKER__DOCKER__HOST",
            "unix:///nonexistent/docker.sock",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["error"]["kind"], "engine_unavailable", "{report:#}");
    assert_eq!(report["error"]["retryable"], true);

    // A job file that is not there: exit 66.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-worker"))
        .args(["job", "/nonexistent/job.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66));

    // submit checks a job as the worker would, before sending it: exit 64, nothing published.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-worker"))
        .args([
            "submit",
            "pull",
            "--name",
            "Bad Name",
            "--push-url",
            "127.0.0.1:5000",
            "--group",
            "g",
        ])
        .env(
            "IMAGE_WORKER__AMQP__URL",
            "amqp://nobody:nothing@127.0.0.1:1/%2f",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid repository name"));

    // Not a job at all: exit 65 and a reason, no report.
    std::fs::write(&file, "{\"uuid\": 5}").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-worker"))
        .args(["job"])
        .arg(&file)
        .env("IMAGE_WORKER__LOGS__ROOT", dir.join("logs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no valid uuid"));
    assert!(out.stdout.is_empty());
}

/// Runs the binary with a broker nobody answers on: exit 64 must come before any publish.
fn image_worker(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-worker"))
        .args(args)
        .env(
            "IMAGE_WORKER__AMQP__URL",
            "amqp://nobody:nothing@127.0.0.1:1/%2f",
        )
        .env_remove("IMAGE_WORKER_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn commands_refuse_what_would_fail_later_with_exit_64() {
    let dir = std::env::temp_dir().join(unique("iw-usage"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let build = |yaml_file: &str| {
        image_worker(
            &[
                "submit",
                "build",
                "--name",
                "team/img",
                "--push-url",
                "127.0.0.1:5000",
                "--group",
                "g",
                "--yaml-file",
                yaml_file,
            ],
            &[],
        )
    };
    // A build file the worker's parser refuses is not sent.
    let (code, stderr) = build(&file("unknown.yaml", "packages: [a]\nbogus: 1\n"));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("unknown keys: bogus"), "{stderr}");
    let (code, stderr) = build(&file("anchors.yaml", "env: &e {A: x}\ncmds: *e\n"));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("anchors and aliases"), "{stderr}");
    let (code, stderr) = build("/nonexistent/build.yaml");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--yaml-file: cannot read /nonexistent/build.yaml"),
        "{stderr}"
    );

    let pull = |extra: &[&str]| {
        let mut args = vec![
            "submit",
            "pull",
            "--name",
            "fixtures/basic",
            "--push-url",
            "127.0.0.1:5000",
            "--group",
            "g",
        ];
        args.extend_from_slice(extra);
        image_worker(&args, &[])
    };
    let (code, stderr) = pull(&["--pool", "a b"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--pool: pool name \"a b\" may hold only letters"),
        "{stderr}"
    );
    let (code, stderr) = pull(&["--username", "u", "--password-env", "IW_TEST_UNSET_VAR"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--password-env: IW_TEST_UNSET_VAR"),
        "{stderr}"
    );
    let (code, stderr) = pull(&["--username", "u", "--password-file", "/nonexistent/pw"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--password-file: cannot read /nonexistent/pw"),
        "{stderr}"
    );
    // A valid submission gets past those checks and fails on the broker nobody answers: 1.
    let (code, stderr) = pull(&["--pool", "lab-2"]);
    assert_eq!(code, Some(1), "{stderr}");

    // A logs root that cannot be written: run, job and config check refuse it.
    let unwritable = [("IMAGE_WORKER__LOGS__ROOT", "/proc/nope")];
    let job = file("job.json", &pull_job("basic").to_string());
    for args in [
        vec!["run"],
        vec!["job", job.as_str()],
        vec!["config", "check"],
    ] {
        let (code, stderr) = image_worker(&args, &unwritable);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains("logs.root /proc/nope cannot be written"),
            "{args:?}: {stderr}"
        );
    }
    assert!(!std::path::Path::new("/proc/nope").exists());

    // A password file that is not there is named as what it is.
    let config = file(
        "config.yaml",
        "registry: {credentials: {r: {username: u, password_file: /nonexistent/pw}}}\n",
    );
    let logs = dir.join("logs").display().to_string();
    let (code, stderr) = image_worker(
        &["config", "check", "--config", &config],
        &[("IMAGE_WORKER__LOGS__ROOT", &logs)],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("registry.credentials.r: cannot read the password file /nonexistent/pw"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn seed_copy_matches_the_shared_contract() {
    // tests/data holds the seed's retrieve example (its trailing comma removed); when the
    // shared contract sits beside the repository, check the copy still matches it.
    let seed = repo_root().join("../shared/seed/test-images-rest-api.txt");
    let copy = seed_record();
    let keys: Vec<&String> = copy.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 27);
    if let Ok(text) = std::fs::read_to_string(&seed) {
        for key in keys {
            assert!(text.contains(&format!("\"{key}\"")), "seed lacks {key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_digest_and_platform() {
    let worker = Worker::start(WorkerOptions::default());
    let mut broker = Broker::connect(&worker.prefix).await;
    let first = pull_job("basic");
    broker.publish_job(&first).await;
    let r1 = broker
        .wait_reply(first["uuid"].as_str().unwrap(), WAIT)
        .await;
    let digest = r1["digest"].as_str().unwrap().to_string();

    let mut by_digest = pull_job("basic");
    by_digest["digest"] = json!(digest);
    by_digest["platform"] = json!("linux/amd64");
    by_digest["discover"] = json!(false);
    broker.publish_job(&by_digest).await;
    let r2 = broker
        .wait_reply(by_digest["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r2["status"], "successful", "{r2:#}");
    assert_eq!(r2["digest"], digest.as_str());
    assert_eq!(
        r2["image"],
        format!("{OPEN_REGISTRY}/fixtures/basic@{digest}")
    );
    assert_eq!(r2["image_id"], r1["image_id"]);
    // discover: false leaves jobs and manifests empty and says so in the log.
    assert_eq!(r2["jobs"], json!([]));
    assert_eq!(r2["discovery"], Value::Null);
    assert!(r2["logs"].as_str().unwrap().contains("discovery skipped"));

    // A platform the registry does not have: the engine would pull amd64 with a mere warning.
    let mut other_platform = pull_job("basic");
    other_platform["platform"] = json!("linux/s390x");
    broker.publish_job(&other_platform).await;
    let r = broker
        .wait_reply(other_platform["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["error"]["kind"], "not_found");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has no linux/s390x image"),
        "{r:#}"
    );

    // A digest the registry does not have: not_found.
    let mut unknown = pull_job("basic");
    unknown["digest"] = json!(format!("sha256:{}", "0".repeat(64)));
    broker.publish_job(&unknown).await;
    let r3 = broker
        .wait_reply(unknown["uuid"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(r3["status"], "failed");
    assert_eq!(r3["error"]["kind"], "not_found", "{r3:#}");
}
