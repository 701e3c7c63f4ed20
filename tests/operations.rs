//! What operators see: health, readiness, metrics, worker events, graceful stop.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let mut worker = Worker::start(WorkerOptions::default());
    assert_eq!(worker.http_get("/healthz"), (200, "ok\n".to_string()));
    let (code, body) = worker.http_get("/readyz");
    assert_eq!((code, body.as_str()), (200, "broker: up\nengine: up\n"));
    assert_eq!(worker.http_get("/nope").0, 404);

    let mut broker = Broker::connect(&worker.prefix).await;
    let job = pull_job("basic");
    broker.publish_job(&job).await;
    let report = broker
        .wait_reply(job["uuid"].as_str().unwrap(), Duration::from_secs(120))
        .await;
    assert_eq!(report["status"], "successful");
    broker.publish_raw("general", b"not json", "x").await;
    assert!(broker.get_dead(Duration::from_secs(30)).await.is_some());

    // The dead letter is visible in its queue a moment before the worker has counted it.
    let mut metrics = String::new();
    for _ in 0..50 {
        let (code, body) = worker.http_get("/metrics");
        assert_eq!(code, 200);
        metrics = body;
        if metrics.contains("image_worker_dead_lettered_total 1\n") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        metrics.contains("image_worker_jobs_total{type=\"pull\",status=\"successful\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("image_worker_job_duration_seconds_count{type=\"pull\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("image_worker_jobs_in_flight 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("image_worker_dead_lettered_total 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("image_worker_broker_up 1\n"), "{metrics}");
    assert!(metrics.contains("image_worker_engine_up 1\n"), "{metrics}");

    // Heartbeats come every second (heartbeat_interval_s: 1 in the test config).
    broker.drain_events(Duration::from_millis(1500)).await;
    // Graceful stop: worker.offline is published and the process exits 0.
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(0));
    broker.drain_events(Duration::from_millis(500)).await;
    let keys = broker.seen_keys();
    assert!(keys.contains(&"worker.offline".to_string()), "{keys:?}");
    let heartbeat: serde_json::Value = broker
        .seen
        .iter()
        .find(|(k, _)| k == "worker.heartbeat")
        .map(|(_, b)| serde_json::from_slice(b).unwrap())
        .expect("a heartbeat");
    assert_eq!(heartbeat["worker"]["site"], "TEST");
    assert!(heartbeat["jobs_in_flight"].is_u64());
}

#[test]
fn systemd_unit_verifies() {
    // systemd-analyze checks the unit's syntax and that ExecStart is executable; point it at
    // the binary this test run built.
    let unit = std::fs::read_to_string(repo_root().join("systemd/image-worker.service")).unwrap();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "SupplementaryGroups=docker",
        "EnvironmentFile=",
        "ReadWritePaths=",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
    // The stop timeout leaves room for the default grace period (60 s).
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec")
        .parse()
        .unwrap();
    assert!(stop > image_worker::config::WorkerConfig::default().shutdown_grace_s);
    let dir = std::env::temp_dir().join(unique("iw-unit"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("image-worker.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/image-worker",
            env!("CARGO_BIN_EXE_image-worker"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_cache_budget_removes_least_recently_used() {
    // Three images of ~3.5 MB each (1.5 MB of their own over a shared busybox layer) against
    // an 8 MB budget: after the third, the first goes; images the worker did not bring stay.
    let images: Vec<String> = (0..3).map(|_| unique_image(1536 * 1024)).collect();
    let worker = Worker::start(WorkerOptions {
        extra_yaml: "cache:\n  max_bytes: 8000000\n".into(),
        ..Default::default()
    });
    let mut broker = Broker::connect(&worker.prefix).await;
    let mut ids = Vec::new();
    for name in &images {
        let mut job = pull_job("basic");
        job["name"] = serde_json::json!(name);
        job["discover"] = serde_json::json!(false);
        broker.publish_job(&job).await;
        let r = broker
            .wait_reply(job["uuid"].as_str().unwrap(), Duration::from_secs(120))
            .await;
        assert_eq!(r["status"], "successful", "{r:#}");
        ids.push(r["image_id"].as_str().unwrap().to_string());
    }
    let present = |id: &str| {
        std::process::Command::new("docker")
            .args(["image", "inspect", id])
            .output()
            .unwrap()
            .status
            .success()
    };
    let start = std::time::Instant::now();
    while present(&ids[0]) && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !present(&ids[0]),
        "the least recently used image is still there"
    );
    assert!(present(&ids[1]) && present(&ids[2]));
    assert!(
        present(&fixture("basic")),
        "an image the worker did not bring was removed"
    );
    assert!(
        worker
            .log_text()
            .contains("removed the least recently used image")
    );
    for id in &ids[1..] {
        let _ = std::process::Command::new("docker")
            .args(["rmi", "-f", id])
            .output();
    }
}

/// A message the broker refuses (406, here a `user_id` that is not the connection's; the same
/// as a report over `max_message_size`) is a final refusal, not a broker to wait for: the
/// daemon then sends a compact report or gives the job up, never the same bytes in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_refuses_is_a_refusal_not_an_outage() {
    setup();
    let connection = std::sync::Arc::new(
        lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
            .await
            .unwrap(),
    );
    let publisher = image_worker::broker::Publisher::open(&connection)
        .await
        .unwrap();
    let refused = publisher
        .publish(
            "",
            "no-such-queue",
            b"{}",
            lapin::BasicProperties::default()
                .with_user_id(lapin::types::ShortString::from("not-guest")),
            false,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, image_worker::broker::PublishError::Refused(m) if m.contains("PRECONDITION_FAILED")),
        "{refused:?}"
    );
    assert!(refused.is_refusal());
    // The refusal closed that channel only: the same publisher goes on, on a new one.
    let queue = unique("iw-after-refusal");
    let declared = publisher
        .channel()
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.name().as_str(), queue);
    publisher
        .publish("", &queue, b"{}", lapin::BasicProperties::default(), true)
        .await
        .unwrap();
    assert_eq!(queue_depth(&queue).await, 1);
    publisher
        .channel()
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_naming_no_queue_is_a_warning_and_the_event_still_reports() {
    let worker = Worker::start(WorkerOptions::default());
    let mut broker = Broker::connect(&worker.prefix).await;
    let job = pull_job("basic");
    let uuid = job["uuid"].as_str().unwrap().to_string();
    let nowhere = unique("iw-no-such-reply-queue");
    broker
        .channel
        .basic_publish(
            format!("{}.jobs", worker.prefix).into(),
            "image.general".into(),
            lapin::options::BasicPublishOptions::default(),
            job.to_string().as_bytes(),
            lapin::BasicProperties::default()
                .with_reply_to(lapin::types::ShortString::from(nowhere.clone())),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut report = None;
    for _ in 0..120 {
        broker.drain_events(Duration::from_millis(500)).await;
        report = broker
            .seen
            .iter()
            .filter(|(k, _)| k == "job.pull.successful")
            .map(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).unwrap())
            .find(|r| r["uuid"] == uuid.as_str());
        if report.is_some() {
            break;
        }
    }
    let report = report.expect("the final event");
    assert_eq!(report["status"], "successful");
    let log = worker.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("reply_to names no queue"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(&nowhere), "{warning}");
    assert!(warning.contains(&uuid), "{warning}");
}
