//! Bad messages against a real worker: every file of `tests/corpus/messages/` (outcomes in its
//! `index.tsv`), plus a > 1 MiB message made here, gives exactly its expected outcome (a dead
//! letter with a reason, or a `failed` report with an `error.kind`), and the same worker still
//! serves a real pull job afterwards. And an image with a 10 MB manifest is pulled with a warning.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// The secret the corpus files carry in their `password` fields.
const CORPUS_SECRET: &str = "corpus-secret-pw";

#[derive(Debug)]
enum Expected {
    /// Dead-lettered; `x-error` contains this.
    Dead(String),
    /// A `failed` report with one of these `error.kind`s.
    Failed(Vec<String>),
}

struct Case {
    file: String,
    body: Vec<u8>,
    expected: Expected,
}

fn corpus_dir() -> PathBuf {
    repo_root().join("tests/corpus/messages")
}

fn load_corpus() -> Vec<Case> {
    let index = std::fs::read_to_string(corpus_dir().join("index.tsv")).unwrap();
    let mut cases = Vec::new();
    for line in index
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let mut cols = line.split('\t');
        let (file, expected) = (cols.next().unwrap(), cols.next().expect("an outcome"));
        let expected = match expected.split_once(':') {
            Some(("dead", reason)) => Expected::Dead(reason.to_string()),
            Some(("failed", kinds)) => {
                Expected::Failed(kinds.split('|').map(str::to_string).collect())
            }
            _ => panic!("{file}: bad outcome {expected:?}"),
        };
        let body = std::fs::read(corpus_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        cases.push(Case {
            file: file.to_string(),
            body,
            expected,
        });
    }
    // Every message file is in the index.
    let mut on_disk: Vec<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|f| f != "index.tsv")
        .collect();
    on_disk.sort();
    let mut indexed: Vec<String> = cases.iter().map(|c| c.file.clone()).collect();
    indexed.sort();
    assert_eq!(on_disk, indexed, "index.tsv and the message files differ");
    cases
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A valid pull job, padded past the 1 MiB limit.
fn huge_case() -> Case {
    let mut job = pull_job("basic");
    job["padding"] = Value::String("x".repeat(1_200_000));
    Case {
        file: "(generated) huge.json".into(),
        body: job.to_string().into_bytes(),
        expected: Expected::Dead("more than the limit of 1048576".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_message_corpus_gives_exact_outcomes_and_the_worker_survives() {
    let mut cases = load_corpus();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    cases.push(huge_case());
    let mut worker = Worker::start(WorkerOptions::default());
    let mut broker = Broker::connect(&worker.prefix).await;

    let (mut dead, mut failed) = (0, 0);
    for case in &cases {
        // One at a time, so each outcome belongs to its message.
        broker.publish_raw("general", &case.body, &case.file).await;
        match &case.expected {
            Expected::Dead(reason) => {
                let (body, x_error) = broker
                    .get_dead(WAIT)
                    .await
                    .unwrap_or_else(|| panic!("{}: not dead-lettered", case.file));
                // The copy is the message itself, but for secret-looking JSON fields, masked;
                // in a body that is not JSON, the corpus password is masked as text.
                let expected = match serde_json::from_slice::<Value>(&case.body) {
                    Ok(mut v) => {
                        let before = v.clone();
                        image_worker::secrets::SecretMask::default().mask_json(&mut v);
                        if v == before {
                            case.body.clone()
                        } else {
                            serde_json::to_vec(&v).unwrap()
                        }
                    }
                    Err(_) if contains(&case.body, CORPUS_SECRET) => {
                        String::from_utf8_lossy(&case.body)
                            .replace(&format!("\"{CORPUS_SECRET}\""), "\"********\"")
                            .into_bytes()
                    }
                    Err(_) => case.body.clone(),
                };
                assert!(
                    !contains(&body, CORPUS_SECRET),
                    "{}: the dead letter holds the password",
                    case.file
                );
                assert!(
                    body == expected,
                    "{}: dead letter is another message ({} bytes, expected {}): {:?}",
                    case.file,
                    body.len(),
                    expected.len(),
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                );
                assert!(
                    x_error.contains(reason.as_str()),
                    "{}: x-error {x_error:?} lacks {reason:?}",
                    case.file
                );
                dead += 1;
            }
            Expected::Failed(kinds) => {
                let sent: Value = serde_json::from_slice(&case.body).unwrap();
                // The report's uuid is the canonical form of the one sent.
                let uuid = uuid::Uuid::parse_str(sent["uuid"].as_str().unwrap())
                    .unwrap()
                    .to_string();
                let report = broker.wait_reply(&uuid, WAIT).await;
                assert_eq!(report["status"], "failed", "{}: {report:#}", case.file);
                let kind = report["error"]["kind"].as_str().unwrap_or_default();
                assert!(
                    kinds.iter().any(|k| k == kind),
                    "{}: error.kind {kind:?}, expected one of {kinds:?}: {}",
                    case.file,
                    report["error"]
                );
                assert_eq!(report["error"]["retryable"], false, "{}", case.file);
                assert!(
                    !report["error"]["message"].as_str().unwrap().is_empty(),
                    "{}",
                    case.file
                );
                assert_eq!(report["uuid"], uuid.as_str(), "{}", case.file);
                assert_seed_shape(&report);
                let text = report.to_string();
                if contains(&case.body, CORPUS_SECRET) && sent.get("password").is_some() {
                    assert!(
                        !text.contains(CORPUS_SECRET),
                        "{}: password in the report",
                        case.file
                    );
                }
                failed += 1;
            }
        }
        assert!(worker.is_running(), "the worker died on {}", case.file);
    }

    // After all that, a real job still works on the same worker.
    let job = pull_job("basic");
    let uuid = job["uuid"].as_str().unwrap().to_string();
    broker.publish_job(&job).await;
    let report = broker.wait_reply(&uuid, Duration::from_secs(120)).await;
    assert_eq!(report["status"], "successful", "{report:#}");
    assert_eq!(report["jobs"], serde_json::json!(expected::BASIC_JOBS));
    assert!(worker.is_running());

    // Exactly the expected outcomes: nothing else was dead-lettered or reported.
    assert!(
        broker.get_dead(Duration::from_secs(2)).await.is_none(),
        "an extra dead letter"
    );
    broker.drain_events(Duration::from_millis(500)).await;
    let replies = broker.seen.iter().filter(|(k, _)| k == "reply").count();
    assert_eq!(replies, failed + 1, "replies");
    let finals: Vec<&String> = broker
        .seen
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("job.") && !k.ends_with(".running"))
        .collect();
    assert_eq!(finals.len(), failed + 1, "final report events: {finals:?}");
    let expected_metric = format!("image_worker_dead_lettered_total {dead}\n");
    let (_, metrics) = worker.http_get("/metrics");
    assert!(metrics.contains(&expected_metric), "{metrics}");
    let invalid_pulls = cases
        .iter()
        .filter(|c| matches!(c.expected, Expected::Failed(_)))
        .filter(|c| serde_json::from_slice::<Value>(&c.body).unwrap()["type"] == "pull")
        .count();
    assert!(
        metrics.contains(&format!(
            "image_worker_jobs_total{{type=\"pull\",status=\"failed\"}} {invalid_pulls}\n"
        )),
        "{metrics}"
    );
    // The corpus carries passwords (in fields, in a push_url): none reaches any output.
    let mut leaks = Vec::new();
    for secret in ["corpus-secret-pw"] {
        if worker.log_text().contains(secret) {
            leaks.push("worker log".to_string());
        }
        for (key, body) in &broker.seen {
            if String::from_utf8_lossy(body).contains(secret) {
                leaks.push(format!("message {key}"));
            }
        }
        for (path, text) in files_under(&worker.logs_root) {
            if text.contains(secret) {
                leaks.push(path.display().to_string());
            }
        }
    }
    assert!(leaks.is_empty(), "the password leaked into {leaks:?}");
    eprintln!(
        "corpus: {} cases, {dead} dead-lettered, {failed} failed reports",
        cases.len()
    );
    worker.stop();
}

/// Builds `127.0.0.1:5000/corpus/bigtem:<unique>` FROM scratch: busybox, a job file and a 10 MB
/// `.tem` beside it under /pyats, and pushes it.
fn build_bigtem_image() -> (String, String) {
    let tag = unique("t");
    let reference = format!("{OPEN_REGISTRY}/corpus/bigtem:{tag}");
    let ctx = std::env::temp_dir().join(unique("iw-bigtem"));
    std::fs::create_dir_all(ctx.join("pyats")).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY pyats /pyats\n",
    )
    .unwrap();
    std::fs::write(
        ctx.join("pyats/big_job.py"),
        "# A job whose manifest is too large to read.\ndef main(runtime):\n    pass\n",
    )
    .unwrap();
    let mut tem = String::from("version: 1\ntype: easypy\ndescription: ");
    tem.push_str(&"x".repeat(10 * 1024 * 1024));
    tem.push('\n');
    std::fs::write(ctx.join("pyats/big_job.tem"), tem).unwrap();
    let out = Command::new("docker")
        .args(["build", "-q", "-t", &reference])
        .arg(&ctx)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    docker(&["push", "-q", &reference]);
    let _ = std::fs::remove_dir_all(&ctx);
    (reference, tag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_manifest_is_a_warning() {
    setup();
    let (reference, tag) = build_bigtem_image();
    let size = 10 * 1024 * 1024 + "version: 1\ntype: easypy\ndescription: \n".len();
    for source in ["layers", "archive"] {
        let mut worker = Worker::start(WorkerOptions {
            extra_yaml: format!("discovery:\n  source: {source}\n"),
            ..Default::default()
        });
        let mut broker = Broker::connect(&worker.prefix).await;
        let job = serde_json::json!({
            "uuid": new_uuid(), "type": "pull", "group": "corpus",
            "name": "corpus/bigtem", "tag": tag, "push_url": OPEN_REGISTRY,
        });
        broker.publish_job(&job).await;
        let report = broker
            .wait_reply(job["uuid"].as_str().unwrap(), Duration::from_secs(180))
            .await;
        assert_eq!(report["status"], "successful", "{source}: {report:#}");
        assert_eq!(report["discovery"]["source"], source);
        assert_eq!(report["jobs"], serde_json::json!(["/pyats/big_job.py"]));
        assert_eq!(report["manifests"], serde_json::json!([]));
        assert_eq!(
            report["warnings"],
            serde_json::json!([format!(
                "/pyats/big_job.tem: manifest is {size} bytes, over the 1048576-byte limit"
            )]),
            "{source}"
        );
        assert!(worker.is_running());
        worker.stop();
    }
    docker(&["rmi", &reference]);
}
