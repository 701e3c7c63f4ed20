//! The fault suite: real worker processes, RabbitMQ, the engine and the registry, with faults
//! injected (killed workers, a restarted broker, a registry answering errors, an engine that
//! goes away, a broker consumer_timeout shorter than a job). Each scenario prints its figures
//! and asserts them: jobs submitted, reports received, lost (0), run twice (0), secrets found (0).
//!
//! The scenarios restart or reconfigure the shared broker, so they run one at a time.

// Each test holds the one-at-a-time lock for its whole run, awaits included: each test has a
// runtime of its own, so the std mutex only orders tests, it cannot deadlock a runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Worker settings for fault tests: quick retries, quick engine checks.
fn fault_options(extra: &str) -> WorkerOptions {
    WorkerOptions {
        extra_yaml: format!("jobs:\n  retry_backoff_ms: 200\n  registry_retries: 4\n{extra}"),
        concurrency: Some(2),
        env: Vec::new(),
    }
}

fn with_env(mut options: WorkerOptions, key: &str, value: &str) -> WorkerOptions {
    options.env.push((key.to_string(), value.to_string()));
    options
}

fn slow_pull_job(registry: &str, name: &str) -> Value {
    json!({
        "uuid": new_uuid(),
        "type": "pull",
        "group": "faults",
        "name": name,
        "tag": "latest",
        "push_url": registry,
        "discover": true,
    })
}

/// Counts final reports by uuid: (reports per uuid, uuids with more than one).
fn tally(finals: &[Value]) -> (HashMap<String, usize>, usize) {
    let mut by_uuid: HashMap<String, usize> = HashMap::new();
    for r in finals {
        *by_uuid
            .entry(r["uuid"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let twice = by_uuid.values().filter(|n| **n > 1).count();
    (by_uuid, twice)
}

fn figures(
    scenario: &str,
    submitted: usize,
    finals: &[Value],
    expected: &[String],
) -> (usize, usize) {
    let (by_uuid, twice) = tally(finals);
    let lost = expected
        .iter()
        .filter(|u| !by_uuid.contains_key(*u))
        .count();
    println!(
        "[faults] {scenario}: submitted {submitted}, reports {}, lost {lost}, reported twice {twice}",
        finals.len()
    );
    (lost, twice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_pull_redelivers_to_another_worker() {
    let _one = serial();
    let image = unique_image(3 << 20);
    let registry = proxy::tcp(OPEN_REGISTRY).await;
    registry.state.set_rate(256 * 1024);
    let prefix = unique("f-kill");
    let mut first = Worker::start_with_prefix(&prefix, fault_options(""));
    let mut results = Results::new(&prefix).await;
    let job = slow_pull_job(&registry.address, &image);
    let uuid = job["uuid"].as_str().unwrap().to_string();
    publish_job(&prefix, &job).await;
    results
        .wait_progress(&uuid, "pulling", Duration::from_secs(60))
        .await;
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));

    registry.state.set_rate(0);
    let second = Worker::start_with_prefix(&prefix, fault_options(""));
    let finals = results
        .wait_finals(1, Duration::from_secs(120))
        .await
        .to_vec();
    // Any late duplicate would show up within a few seconds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    results.poll().await;
    let (lost, twice) = figures(
        "SIGKILL mid-pull",
        1,
        &results.finals,
        std::slice::from_ref(&uuid),
    );
    assert_eq!((lost, twice), (0, 0));
    let report = &finals[0];
    assert_eq!(report["status"], "successful", "{report:#}");
    assert_eq!(report["redelivered"], true);
    assert_ne!(report["worker"]["worker_id"], Value::Null);
    assert!(second.log_text().contains(&uuid));
    assert_eq!(report["jobs"], json!(["/pyats/slow_job.py"]));
    results.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_build_redelivers_to_another_worker() {
    let _one = serial();
    let prefix = unique("f-killb");
    let options = || {
        let mut o = fault_options("");
        o.extra_yaml
            .push_str(&common::builds::build_worker_yaml(&[], ""));
        o
    };
    let mut first = Worker::start_with_prefix(&prefix, options());
    let mut results = Results::new(&prefix).await;
    // A build whose last step takes a while; unique, so the engine's cache cannot skip it.
    let marker = unique("slow");
    let job = json!({
        "uuid": new_uuid(),
        "type": "build",
        "group": "faults",
        "name": format!("faults/{marker}"),
        "tag": "1.0",
        "push_url": OPEN_REGISTRY,
        "yaml_content": format!("cmds:\n  post: 'echo {marker}; sleep 8'\n"),
    });
    let uuid = job["uuid"].as_str().unwrap().to_string();
    publish_job(&prefix, &job).await;
    results
        .wait_progress(&uuid, "building", Duration::from_secs(120))
        .await;
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));

    let _second = Worker::start_with_prefix(&prefix, options());
    let report = results.wait_finals(1, Duration::from_secs(300)).await[0].clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    results.poll().await;
    let (lost, twice) = figures(
        "SIGKILL mid-build",
        1,
        &results.finals,
        std::slice::from_ref(&uuid),
    );
    assert_eq!((lost, twice), (0, 0));
    assert_eq!(report["status"], "successful", "{report:#}");
    assert_eq!(report["type"], "pyats");
    assert_eq!(report["redelivered"], true);
    assert!(report["digest"].as_str().unwrap().starts_with("sha256:"));
    let _ = std::process::Command::new("docker")
        .args(["rmi", &format!("{OPEN_REGISTRY}/faults/{marker}:1.0")])
        .output();
    results.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restart_while_jobs_run_and_wait() {
    let _one = serial();
    let image = unique_image(2 << 20);
    let registry = proxy::tcp(OPEN_REGISTRY).await;
    registry.state.set_rate(200 * 1024);
    let prefix = unique("f-broker");
    let mut worker = Worker::start_with_prefix(&prefix, fault_options(""));
    let mut results = Results::new(&prefix).await;
    // One slow job running, five quick ones queued behind it (concurrency 2: one more runs).
    let slow = slow_pull_job(&registry.address, &image);
    let mut uuids = vec![slow["uuid"].as_str().unwrap().to_string()];
    publish_job(&prefix, &slow).await;
    results
        .wait_progress(&uuids[0], "pulling", Duration::from_secs(60))
        .await;
    for _ in 0..5 {
        let mut j = pull_job("basic");
        j["pin_version"] = json!(true);
        uuids.push(j["uuid"].as_str().unwrap().to_string());
        publish_job(&prefix, &j).await;
    }
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    registry.state.set_rate(0);

    results
        .wait_finals(uuids.len(), Duration::from_secs(180))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    results.poll().await;
    let (lost, twice) = figures("RabbitMQ restart", uuids.len(), &results.finals, &uuids);
    assert_eq!(lost, 0);
    // A job whose report was confirmed is never reported again; one whose report raced the
    // restart may be, with the same content (same worker, same result).
    for r in &results.finals {
        assert_eq!(r["status"], "successful", "{r:#}");
    }
    let executions = worker.log_text().matches("job successful").count();
    println!(
        "[faults] RabbitMQ restart: executions {executions} for {} jobs, reported twice {twice}",
        uuids.len()
    );
    assert_eq!(
        executions,
        uuids.len(),
        "a job ran twice:\n{}",
        worker.log_text()
    );
    worker.wait_for_log("reconnecting", Duration::from_secs(1));
    results.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_errors_are_retried_and_auth_errors_are_not() {
    let _one = serial();
    let registry = proxy::tcp(OPEN_REGISTRY).await;
    let prefix = unique("f-reg");
    let worker = Worker::start_with_prefix(&prefix, fault_options(""));
    let mut results = Results::new(&prefix).await;

    // 500, then 429, then the registry works.
    registry.state.fail_next(&[500, 500, 500, 429, 429, 429]);
    let image = unique_image(256 * 1024);
    let job = slow_pull_job(&registry.address, &image);
    publish_job(&prefix, &job).await;
    let report = results.wait_finals(1, Duration::from_secs(120)).await[0].clone();
    assert_eq!(report["status"], "successful", "{report:#}");
    let log = std::fs::read_to_string(
        std::path::Path::new(report["logs_dir"].as_str().unwrap()).join("job.log"),
    )
    .unwrap();
    // The engine itself retries some requests, so how many of the six errors reach the worker
    // varies; at least one does, is logged as a try, and the job succeeds.
    let tries = log.matches("trying again in").count();
    println!("[faults] registry 500 x3 then 429 x3: worker tries logged {tries}");
    assert!(tries >= 1, "{log}");
    assert!(log.contains("try 1 failed (registry_error)"), "{log}");
    assert!(
        registry.state.failures.lock().unwrap().is_empty(),
        "not every injected error was met"
    );

    // A registry that keeps failing: failed after the configured tries, retryable.
    registry.state.fail_next(&[503; 1000]);
    let job = slow_pull_job(&registry.address, &image);
    publish_job(&prefix, &job).await;
    let report = results.wait_finals(2, Duration::from_secs(120)).await[1].clone();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["error"]["kind"], "registry_error", "{report:#}");
    assert_eq!(report["error"]["retryable"], true);
    assert_eq!(
        report["logs"]
            .as_str()
            .unwrap()
            .matches("trying again in")
            .count(),
        4
    );
    registry.state.failures.lock().unwrap().clear();

    // Wrong credentials: one try only.
    let mut job = slow_pull_job(AUTH_REGISTRY, "fixtures/basic");
    job["username"] = json!(REG_USER);
    job["password"] = json!("definitely-wrong-pw");
    publish_job(&prefix, &job).await;
    let report = results.wait_finals(3, Duration::from_secs(60)).await[2].clone();
    assert_eq!(report["error"]["kind"], "auth", "{report:#}");
    assert!(
        !report["logs"].as_str().unwrap().contains("trying again"),
        "{}",
        report["logs"]
    );
    let (_, metrics) = worker.http_get("/metrics");
    let retries: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("image_worker_registry_retries_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(retries >= 5, "{metrics}");
    let secrets = worker.log_text().matches("definitely-wrong-pw").count();
    println!("[faults] registry errors: secrets found {secrets}");
    assert_eq!(secrets, 0);
    results.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_restart_mid_push_to_the_mirror() {
    let _one = serial();
    let mirror = proxy::tcp(AUTH_REGISTRY).await;
    let prefix = unique("f-push");
    let worker = Worker::start_with_prefix(
        &prefix,
        fault_options(&format!(
            "registry:\n  mirror: {}\n  credentials:\n    \"{}\":\n      username: {REG_USER}\n      password: {REG_PASS}\n",
            mirror.address, mirror.address
        )),
    );
    let mut results = Results::new(&prefix).await;
    let image = unique_image(3 << 20);
    mirror.state.set_rate(256 * 1024);
    let job = slow_pull_job(OPEN_REGISTRY, &image);
    let uuid = job["uuid"].as_str().unwrap().to_string();
    publish_job(&prefix, &job).await;
    results
        .wait_progress(&uuid, "pushing", Duration::from_secs(60))
        .await;
    // The registry goes away mid-push, then comes back.
    mirror.state.set_down(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    mirror.state.set_rate(0);
    mirror.state.set_down(false);
    let report = results.wait_finals(1, Duration::from_secs(120)).await[0].clone();
    assert_eq!(report["status"], "successful", "{report:#}");
    assert_eq!(report["push_url"], format!("{}/faults", mirror.address));
    // The outage was real: the engine (which retries layer uploads itself) or the worker tried again.
    let log = std::fs::read_to_string(
        std::path::Path::new(report["logs_dir"].as_str().unwrap()).join("job.log"),
    )
    .unwrap();
    assert!(
        log.contains("Retrying in") || log.contains("trying again in"),
        "{log}"
    );
    assert!(report["digest"].as_str().unwrap().starts_with("sha256:"));
    println!("[faults] registry restart mid-push: reports 1, lost 0");
    assert!(!worker.log_text().contains(REG_PASS));
    results.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engine_away_stops_consumption_until_it_returns() {
    let _one = serial();
    // The worker talks to the engine through a socket proxy we can take down: the real engine
    // is shared with everything else on this machine and is not ours to stop.
    let engine = proxy::unix("/var/run/docker.sock").await;
    let prefix = unique("f-engine");
    let worker = Worker::start_with_prefix(
        &prefix,
        fault_options(&format!(
            "docker:\n  host: unix://{}\n  ping_interval_s: 1\n",
            engine.address
        )),
    );
    let mut results = Results::new(&prefix).await;
    assert_eq!(worker.http_get("/readyz").0, 200);
    engine.state.set_down(true);
    let start = Instant::now();
    while worker.http_get("/readyz").0 != 503 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "readyz stayed 200"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, body) = worker.http_get("/readyz");
    assert_eq!(body, "broker: up\nengine: down\n");
    let job = pull_job("basic");
    publish_job(&prefix, &job).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        queue_depth(&format!("{prefix}.jobs.image.general")).await,
        1,
        "a job was taken while the engine was away"
    );
    assert_eq!(results.poll().await, 0);
    engine.state.set_down(false);
    let report = results.wait_finals(1, Duration::from_secs(60)).await[0].clone();
    assert_eq!(report["status"], "successful", "{report:#}");
    assert_eq!(worker.http_get("/readyz").0, 200);
    println!("[faults] engine away: jobs failed for it 0, reports 1");
    results.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_job_outlives_consumer_timeout_with_a_lease() {
    let _one = serial();
    // RabbitMQ 3.10 reads consumer_timeout when a channel opens and checks it about once a
    // minute: a 5 s timeout, two workers started under it, a job of ~80 s on each.
    rabbitmqctl(&[
        "eval",
        "application:set_env(rabbit, consumer_timeout, 5000).",
    ]);
    let registry = proxy::tcp(OPEN_REGISTRY).await;
    registry.state.set_rate(80 * 1024);
    let leased_prefix = unique("f-lease");
    let bare_prefix = unique("f-nolease");
    let leased = Worker::start_with_prefix(
        &leased_prefix,
        fault_options("  lease_after_s: 2\n  lease_s: 6\n"),
    );
    let bare = Worker::start_with_prefix(&bare_prefix, fault_options("  lease_after_s: 100000\n"));
    rabbitmqctl(&[
        "eval",
        "application:set_env(rabbit, consumer_timeout, 1800000).",
    ]);
    let mut leased_results = Results::new(&leased_prefix).await;
    let mut bare_results = Results::new(&bare_prefix).await;
    let job_a = slow_pull_job(&registry.address, &unique_image(6 << 20));
    let job_b = slow_pull_job(&registry.address, &unique_image(6 << 20));
    publish_job(&leased_prefix, &job_a).await;
    publish_job(&bare_prefix, &job_b).await;

    let report = leased_results
        .wait_finals(1, Duration::from_secs(300))
        .await[0]
        .clone();
    assert_eq!(report["status"], "successful", "{report:#}");
    tokio::time::sleep(Duration::from_secs(8)).await;
    leased_results.poll().await;
    let (lost, twice) = figures(
        "consumer_timeout 5 s with a lease",
        1,
        &leased_results.finals,
        &[job_a["uuid"].as_str().unwrap().to_string()],
    );
    assert_eq!((lost, twice), (0, 0));
    let log = leased.log_text();
    assert!(log.contains("held by a lease"), "{log}");
    assert!(
        !log.contains("reconnecting"),
        "the broker closed the leased worker's channel:\n{log}"
    );
    assert_eq!(log.matches("job successful").count(), 1);
    // The lease queue is gone once the report is out.
    let lease_queue = format!("{leased_prefix}.lease.{}", job_a["uuid"].as_str().unwrap());
    assert!(!rabbitmqctl(&["list_queues", "name"]).contains(&lease_queue));

    // Without a lease the broker closes the channel under the job: what the lease prevents.
    let bare_log_has_timeout = {
        let start = Instant::now();
        loop {
            let log = bare.log_text();
            if log.contains("reconnecting") {
                break true;
            }
            if start.elapsed() > Duration::from_secs(120) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    println!(
        "[faults] consumer_timeout 5 s without a lease: channel closed by the broker: {bare_log_has_timeout}"
    );
    assert!(bare_log_has_timeout, "{}", bare.log_text());
    bare_results.wait_finals(1, Duration::from_secs(300)).await;
    leased_results.delete().await;
    bare_results.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_and_without_time_to_finish() {
    let _one = serial();
    let registry = proxy::tcp(OPEN_REGISTRY).await;
    registry.state.set_rate(400 * 1024);

    // With time: the running job finishes, is reported, the worker exits 0.
    let prefix = unique("f-term");
    let mut worker = Worker::start_with_prefix(&prefix, fault_options(""));
    let mut results = Results::new(&prefix).await;
    let job = slow_pull_job(&registry.address, &unique_image(2 << 20));
    let uuid = job["uuid"].as_str().unwrap().to_string();
    publish_job(&prefix, &job).await;
    results
        .wait_progress(&uuid, "pulling", Duration::from_secs(60))
        .await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(60)), Some(0));
    let report = results.wait_finals(1, Duration::from_secs(10)).await[0].clone();
    assert_eq!(report["status"], "successful", "{report:#}");
    assert!(worker.log_text().contains("waiting for running jobs"));

    // Without time (grace 1 s): the job goes back to the queue; the next worker completes it.
    let prefix = unique("f-term2");
    let mut worker = Worker::start_with_prefix(
        &prefix,
        with_env(
            fault_options(""),
            "IMAGE_WORKER__WORKER__SHUTDOWN_GRACE_S",
            "1",
        ),
    );
    let mut results = Results::new(&prefix).await;
    let job = slow_pull_job(&registry.address, &unique_image(3 << 20));
    let uuid = job["uuid"].as_str().unwrap().to_string();
    publish_job(&prefix, &job).await;
    results
        .wait_progress(&uuid, "pulling", Duration::from_secs(60))
        .await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(
        worker.log_text().contains("grace period over"),
        "{}",
        worker.log_text()
    );
    results.poll().await;
    assert!(results.finals.is_empty(), "{:?}", results.finals);
    registry.state.set_rate(0);
    let _next = Worker::start_with_prefix(&prefix, fault_options(""));
    let report = results.wait_finals(1, Duration::from_secs(120)).await[0].clone();
    assert_eq!(report["status"], "successful", "{report:#}");
    assert_eq!(report["redelivered"], true);
    println!(
        "[faults] SIGTERM: with time reported 1, without time requeued and reported 1, lost 0"
    );
    results.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_and_timeout() {
    let _one = serial();
    let registry = proxy::tcp(OPEN_REGISTRY).await;
    registry.state.set_rate(100 * 1024);
    let prefix = unique("f-cancel");
    let worker = Worker::start_with_prefix(&prefix, fault_options(""));
    let mut results = Results::new(&prefix).await;
    let cancel = |uuid: String| {
        let config = worker.config_path.clone();
        async move {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-worker"))
                .args(["cancel", &uuid, "--config"])
                .arg(config)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };

    // In flight: the pull stops, the report says cancelled.
    let running = slow_pull_job(&registry.address, &unique_image(3 << 20));
    let running_uuid = running["uuid"].as_str().unwrap().to_string();
    publish_job(&prefix, &running).await;
    results
        .wait_progress(&running_uuid, "pulling", Duration::from_secs(60))
        .await;
    cancel(running_uuid.clone()).await;
    let report = results.wait_finals(1, Duration::from_secs(30)).await[0].clone();
    assert_eq!(report["uuid"], running_uuid.as_str());
    assert_eq!(report["status"], "cancelled", "{report:#}");
    assert_eq!(report["error"]["kind"], "cancelled");

    // Not started yet: answered cancelled when it arrives.
    let queued = pull_job("basic");
    let queued_uuid = queued["uuid"].as_str().unwrap().to_string();
    cancel(queued_uuid.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_job(&prefix, &queued).await;
    let report = results.wait_finals(2, Duration::from_secs(30)).await[1].clone();
    assert_eq!(report["uuid"], queued_uuid.as_str());
    assert_eq!(report["status"], "cancelled", "{report:#}");

    // A job over its timeout_s fails with kind timeout.
    let mut slow = slow_pull_job(&registry.address, &unique_image(3 << 20));
    slow["timeout_s"] = json!(2);
    publish_job(&prefix, &slow).await;
    let report = results.wait_finals(3, Duration::from_secs(60)).await[2].clone();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["error"]["kind"], "timeout", "{report:#}");
    println!("[faults] cancel and timeout: cancelled 2, timed out 1");
    results.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_queued_jobs_across_three_workers() {
    let _one = serial();
    let prefix = unique("f-many");
    // Queue first, then start the workers: they compete for the backlog.
    let mut results = Results::new(&prefix).await;
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    image_worker::broker::Topology::new(&prefix)
        .declare(&ch, &[("image".to_string(), "general".to_string())])
        .await
        .unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut uuids = Vec::new();
    let mut confirms = Vec::new();
    for _ in 0..500 {
        let mut job = pull_job("basic");
        job["pin_version"] = json!(true);
        job["discover"] = json!(false);
        uuids.push(job["uuid"].as_str().unwrap().to_string());
        confirms.push(
            ch.basic_publish(
                format!("{prefix}.jobs").into(),
                "image.general".into(),
                Default::default(),
                job.to_string().as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        c.await.unwrap();
    }
    let started = Instant::now();
    let workers: Vec<Worker> = (0..3)
        .map(|_| {
            Worker::start_with_prefix(
                &prefix,
                with_env(fault_options(""), "IMAGE_WORKER__WORKER__CONCURRENCY", "4"),
            )
        })
        .collect();
    results.wait_finals(500, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    results.poll().await;
    let (lost, twice) = figures("500 jobs, 3 workers", 500, &results.finals, &uuids);
    let per_worker: Vec<usize> = workers
        .iter()
        .map(|w| w.log_text().matches("report published").count())
        .collect();
    println!(
        "[faults] 500 jobs, 3 workers: {:.1} s, per worker {per_worker:?}",
        elapsed.as_secs_f64()
    );
    assert_eq!((lost, twice), (0, 0));
    assert_eq!(results.finals.len(), 500);
    assert!(results.finals.iter().all(|r| r["status"] == "successful"));
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "a worker took no job: {per_worker:?}"
    );
    results.delete().await;
}
