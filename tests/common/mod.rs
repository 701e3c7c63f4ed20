//! Shared helpers for the end-to-end tests: the real Docker engine, RabbitMQ and registries.
//!
//! Each test starts its own worker process with its own AMQP prefix and logs root, so tests run
//! in parallel without seeing each other's queues.
#![allow(dead_code)]
pub mod builds;
pub mod expected;
pub mod proxy;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::Value;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const OPEN_REGISTRY: &str = "127.0.0.1:5000";
pub const AUTH_REGISTRY: &str = "127.0.0.1:5001";
pub const REG_USER: &str = "iwtest";
pub const REG_PASS: &str = "iwtest-secret-pw";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_script(script: &str, args: &[&str]) {
    let out = Command::new("bash")
        .arg(repo_root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Services up and fixture images pushed (both scripts are idempotent and quick when done).
pub fn setup() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if std::env::var_os("IW_SKIP_SETUP").is_none() {
            run_script("scripts/services.sh", &["up"]);
            run_script("scripts/fixtures.sh", &[]);
            run_script("scripts/base-image.sh", &[]);
        }
    });
}

pub fn fixture(name: &str) -> String {
    format!("{OPEN_REGISTRY}/fixtures/{name}:latest")
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Runs the docker CLI; panics with its output when it fails.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn image_id(reference: &str) -> String {
    docker(&["image", "inspect", "--format", "{{.Id}}", reference])
}

/// What a test worker is configured with, beyond the defaults.
#[derive(Default, Clone)]
pub struct WorkerOptions {
    /// Extra YAML appended to the config file.
    pub extra_yaml: String,
    pub concurrency: Option<u16>,
    /// Environment overrides (`IMAGE_WORKER__...`).
    pub env: Vec<(String, String)>,
}

/// A worker process of our binary, with its own prefix, config, logs root and captured log.
pub struct Worker {
    child: Option<Child>,
    pub prefix: String,
    pub dir: PathBuf,
    pub logs_root: PathBuf,
    pub config_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl Worker {
    pub fn start(options: WorkerOptions) -> Worker {
        Self::start_with_prefix(&unique("t"), options)
    }

    pub fn start_with_prefix(prefix: &str, options: WorkerOptions) -> Worker {
        setup();
        let dir = std::env::temp_dir().join(format!("iw-test-{}", unique("w")));
        std::fs::create_dir_all(&dir).unwrap();
        let logs_root = dir.join("logs");
        let config_path = dir.join("config.yaml");
        let config = format!(
            "worker:\n  site: TEST\n  bldg: TEST-1\n  concurrency: {}\n  heartbeat_interval_s: 1\n  shutdown_grace_s: 20\n  service_url: http://127.0.0.1:0/workers/api/v1\n\
             amqp:\n  url: {AMQP_URL}\n  prefix: {prefix}\n\
             logs:\n  root: {}\nhttp:\n  listen: 127.0.0.1:0\n{}",
            options.concurrency.unwrap_or(2),
            logs_root.display(),
            options.extra_yaml
        );
        std::fs::write(&config_path, config).unwrap();
        let stderr_path = dir.join("worker.log");
        let child = Command::new(env!("CARGO_BIN_EXE_image-worker"))
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .env_remove("IMAGE_WORKER_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start the worker");
        PREFIX_USERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(prefix.to_string());
        let mut worker = Worker {
            child: Some(child),
            prefix: prefix.to_string(),
            dir,
            logs_root,
            config_path,
            stderr_path,
        };
        worker.wait_for_log("consuming", Duration::from_secs(60));
        worker
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits until the worker's log holds `needle`; panics with the log after `timeout`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "worker exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "worker did not log {needle:?} within {timeout:?}:\n{}",
            self.log_text()
        );
    }

    /// The address of the worker's HTTP endpoint, from its start-up log line.
    pub fn http_addr(&self) -> String {
        let log = self.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("http endpoint listening"))
            .expect("the worker logs its http address");
        let start = line.find("address=").expect("address field") + "address=".len();
        line[start..].split_whitespace().next().unwrap().to_string()
    }

    /// GET `path` on the worker's HTTP endpoint: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(self.http_addr()).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    /// Is the worker process still running (not exited, not a zombie)?
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal to the worker process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "worker did not exit within {timeout:?}:\n{}",
            self.log_text()
        );
    }

    pub fn stop(&mut self) {
        if self.child.is_some() {
            self.signal("TERM");
            self.wait_exit(Duration::from_secs(30));
        }
    }
}

/// Workers alive per AMQP prefix: the last one to go removes the prefix's queues.
static PREFIX_USERS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let last = {
            let mut users = PREFIX_USERS.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = users.iter().position(|p| *p == self.prefix) {
                users.remove(i);
            }
            !users.contains(&self.prefix)
        };
        // A failed test keeps everything for a look; a passed one leaves nothing behind.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
            if last {
                remove_topology(&self.prefix);
            }
        }
    }
}

/// Deletes a test prefix's durable queues and exchanges from the shared broker.
pub fn remove_topology(prefix: &str) {
    let prefix = prefix.to_string();
    // Drop runs inside the test's runtime; a runtime of its own needs a thread of its own.
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
            else {
                return;
            };
            for cap in ["image", "polaris_image"] {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .queue_delete(
                            format!("{prefix}.jobs.{cap}.general").into(),
                            Default::default(),
                        )
                        .await;
                }
            }
            for queue in ["dead", "test-results"] {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .queue_delete(format!("{prefix}.{queue}").into(), Default::default())
                        .await;
                }
            }
            for exchange in ["jobs", "events", "control"] {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .exchange_delete(format!("{prefix}.{exchange}").into(), Default::default())
                        .await;
                }
            }
            let _ = conn.close(200, "cleanup".into()).await;
        });
    })
    .join();
}

/// A test's own connection to the broker: publishes jobs and listens to everything on the
/// prefix's events exchange.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
    pub prefix: String,
    events: Consumer,
    replies: Consumer,
    pub reply_queue: String,
    /// Every message seen on the events exchange and the reply queue: (routing key, body).
    pub seen: Vec<(String, Vec<u8>)>,
}

impl Broker {
    pub async fn connect(prefix: &str) -> Broker {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        // The worker declared the events exchange before it logged "consuming".
        let events_queue = channel
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .unwrap();
        channel
            .queue_bind(
                events_queue.name().clone(),
                format!("{prefix}.events").into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let events = channel
            .basic_consume(
                events_queue.name().clone(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reply_queue = channel
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .unwrap();
        let replies = channel
            .basic_consume(
                reply_queue.name().clone(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .unwrap();
        Broker {
            reply_queue: reply_queue.name().as_str().to_string(),
            connection,
            channel,
            prefix: prefix.to_string(),
            events,
            replies,
            seen: Vec::new(),
        }
    }

    /// Publishes raw bytes as a job to `image.<pool>` with our reply queue.
    pub async fn publish_raw(&self, pool: &str, body: &[u8], correlation: &str) {
        self.publish_with_headers(pool, body, correlation, FieldTable::default())
            .await;
    }

    /// Publishes a job again as the broker hands back an expired lease: with an `x-death`
    /// header, so the worker takes it as a redelivery.
    pub async fn publish_dead_lettered_copy(&self, job: &Value) {
        use lapin::types::{AMQPValue, FieldArray, LongString};
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from("expired")),
        );
        death.insert(
            "queue".into(),
            AMQPValue::LongString(LongString::from(format!(
                "{}.lease.{}",
                self.prefix,
                job["uuid"].as_str().unwrap_or_default()
            ))),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let uuid = job["uuid"].as_str().unwrap_or_default().to_string();
        self.publish_with_headers("general", job.to_string().as_bytes(), &uuid, headers)
            .await;
    }

    /// Publishes raw bytes to `image.<pool>` with our reply queue and these headers.
    pub async fn publish_with_headers(
        &self,
        pool: &str,
        body: &[u8],
        correlation: &str,
        headers: FieldTable,
    ) {
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2)
            .with_reply_to(ShortString::from(self.reply_queue.clone()))
            .with_correlation_id(ShortString::from(correlation.to_string()));
        self.channel
            .basic_publish(
                format!("{}.jobs", self.prefix).into(),
                format!("image.{pool}").into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    pub async fn publish_job(&self, job: &Value) {
        let uuid = job["uuid"].as_str().unwrap_or_default().to_string();
        self.publish_raw("general", job.to_string().as_bytes(), &uuid)
            .await;
    }

    /// Publishes a job to `<cap>.general` (e.g. `polaris_image`) with our reply queue.
    pub async fn publish_job_to(&self, cap: &str, job: &Value) {
        let uuid = job["uuid"].as_str().unwrap_or_default().to_string();
        let props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2)
            .with_reply_to(ShortString::from(self.reply_queue.clone()))
            .with_correlation_id(ShortString::from(uuid));
        self.channel
            .basic_publish(
                format!("{}.jobs", self.prefix).into(),
                format!("{cap}.general").into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                job.to_string().as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Waits for the reply (the final report) with this correlation id; records events seen.
    pub async fn wait_reply(&mut self, uuid: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::select! {
                d = self.replies.next() => {
                    let d = d.expect("reply stream").expect("reply delivery");
                    self.seen.push(("reply".into(), d.data.clone()));
                    let correlation = d.properties.correlation_id().as_ref().map(|c| c.as_str().to_string());
                    if correlation.as_deref() == Some(uuid) {
                        return serde_json::from_slice(&d.data).expect("report is JSON");
                    }
                }
                d = self.events.next() => {
                    let d = d.expect("event stream").expect("event delivery");
                    self.seen.push((d.routing_key.as_str().to_string(), d.data.clone()));
                }
                _ = tokio::time::sleep_until(deadline) => panic!("no report for {uuid} within {timeout:?}"),
            }
        }
    }

    /// Collects events for `duration` more.
    pub async fn drain_events(&mut self, duration: Duration) {
        let deadline = tokio::time::Instant::now() + duration;
        loop {
            tokio::select! {
                d = self.events.next() => {
                    let d = d.expect("event stream").expect("event delivery");
                    self.seen.push((d.routing_key.as_str().to_string(), d.data.clone()));
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    pub fn seen_keys(&self) -> Vec<String> {
        self.seen.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Takes one message from the dead-letter queue: (body, x-error).
    pub async fn get_dead(&self, timeout: Duration) -> Option<(Vec<u8>, String)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(msg) = self
                .channel
                .basic_get(
                    format!("{}.dead", self.prefix).into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()
            {
                let reason =
                    image_worker::broker::header_string(&msg.delivery.properties, "x-error")
                        .unwrap_or_default();
                return Some((msg.delivery.data.clone(), reason));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

/// A pull job for a fixture on the open registry.
pub fn pull_job(fixture_name: &str) -> Value {
    serde_json::json!({
        "uuid": new_uuid(),
        "type": "pull",
        "group": "testers",
        "name": format!("fixtures/{fixture_name}"),
        "tag": "latest",
        "push_url": OPEN_REGISTRY,
        "discover": true,
        "pin_version": false,
        "submitter": "tests",
        "automation_token": "Jwt not-a-real-token-but-secret",
    })
}

/// The seed's image record (tests/data copy of the retrieve response).
pub fn seed_record() -> Value {
    let text =
        std::fs::read_to_string(repo_root().join("tests/data/seed_image_record.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Asserts `report` has every field of the seed record with the seed's JSON type (recursively
/// into `meta` and `worker`; a seed null accepts null or a string).
pub fn assert_seed_shape(report: &Value) {
    fn check(seed: &Value, got: &Value, path: &str, recurse: bool) {
        let (Value::Object(seed), Value::Object(got)) = (seed, got) else {
            panic!("{path} is not an object");
        };
        for (key, seed_value) in seed {
            let here = format!("{path}.{key}");
            let value = got
                .get(key)
                .unwrap_or_else(|| panic!("report lacks {here}"));
            match seed_value {
                Value::Null => assert!(
                    value.is_null() || value.is_string(),
                    "{here}: expected null or a string, got {value}"
                ),
                _ => assert_eq!(
                    json_type(value),
                    json_type(seed_value),
                    "{here}: wrong type ({value})"
                ),
            }
            if recurse && matches!(key.as_str(), "meta" | "worker" | "container_details") {
                check(seed_value, value, &here, key == "meta");
            }
        }
    }
    check(&seed_record(), report, "report", true);
}

/// Every file under `dir`, read as text.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if entry.file_type().is_file() {
            let mut text = String::new();
            let _ = std::fs::File::open(entry.path()).and_then(|mut f| f.read_to_string(&mut text));
            out.push((entry.path().to_path_buf(), text));
        }
    }
    out
}

/// Builds a unique image holding `size` random bytes and one pyATS job, pushes it to the open
/// registry and removes it locally: pulling it really downloads `size` bytes. Returns the
/// repository below `127.0.0.1:5000/`.
pub fn unique_image(size: usize) -> String {
    let name = format!("faults/{}", unique("img"));
    let dir = std::env::temp_dir().join(unique("iw-img"));
    std::fs::create_dir_all(dir.join("pyats")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    let mut blob = vec![0u8; size];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut blob)
        .unwrap();
    std::fs::write(dir.join("blob"), blob).unwrap();
    std::fs::write(
        dir.join("pyats/slow_job.py"),
        "def main(runtime):\n    pass\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY pyats /pyats\nCOPY blob /blob\n",
    )
    .unwrap();
    let reference = format!("{OPEN_REGISTRY}/{name}:latest");
    let out = Command::new("docker")
        .args(["build", "-q", "-t", &reference])
        .arg(&dir)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    docker(&["push", "-q", &reference]);
    docker(&["rmi", &reference]);
    let _ = std::fs::remove_dir_all(dir);
    name
}

/// A durable queue bound to every job event of a prefix: unlike an exclusive reply queue, it
/// outlives a broker restart, so a test can count reports across one.
pub struct Results {
    prefix: String,
    queue: String,
    channel: Option<Channel>,
    connection: Option<Connection>,
    /// Final reports seen, in order.
    pub finals: Vec<Value>,
    /// Running events seen.
    pub running: Vec<Value>,
}

impl Results {
    pub async fn new(prefix: &str) -> Results {
        let mut r = Results {
            prefix: prefix.to_string(),
            queue: format!("{prefix}.test-results"),
            channel: None,
            connection: None,
            finals: Vec::new(),
            running: Vec::new(),
        };
        r.channel().await;
        r
    }

    async fn channel(&mut self) -> Channel {
        if let Some(c) = &self.channel
            && c.status().connected()
        {
            return c.clone();
        }
        for _ in 0..600 {
            if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
                let ch = conn.create_channel().await.unwrap();
                ch.exchange_declare(
                    format!("{}.events", self.prefix).into(),
                    lapin::ExchangeKind::Topic,
                    lapin::options::ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
                ch.queue_declare(
                    self.queue.clone().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
                ch.queue_bind(
                    self.queue.clone().into(),
                    format!("{}.events", self.prefix).into(),
                    "job.#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
                self.channel = Some(ch.clone());
                self.connection = Some(conn);
                return ch;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("cannot reach RabbitMQ");
    }

    /// Takes what is in the queue now; returns how many messages it took.
    pub async fn poll(&mut self) -> usize {
        let mut n = 0;
        loop {
            let channel = self.channel().await;
            match channel
                .basic_get(self.queue.clone().into(), BasicGetOptions { no_ack: true })
                .await
            {
                Ok(Some(msg)) => {
                    n += 1;
                    let v: Value = serde_json::from_slice(&msg.delivery.data).unwrap();
                    if v["status"] == "running" {
                        self.running.push(v);
                    } else {
                        self.finals.push(v);
                    }
                }
                Ok(None) => return n,
                Err(_) => {
                    self.channel = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Waits until `n` final reports have arrived in all.
    pub async fn wait_finals(&mut self, n: usize, timeout: Duration) -> &[Value] {
        let start = Instant::now();
        while self.finals.len() < n {
            assert!(
                start.elapsed() < timeout,
                "{} of {n} reports within {timeout:?}",
                self.finals.len()
            );
            if self.poll().await == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        &self.finals
    }

    /// Waits for a running event of `uuid` with bytes already moved in `phase`.
    pub async fn wait_progress(&mut self, uuid: &str, phase: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.running.iter().any(|e| {
                e["uuid"] == uuid
                    && e["phase"] == phase
                    && e["progress"]["current"].as_u64() > Some(0)
            }) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "no {phase} progress for {uuid} within {timeout:?}"
            );
            if self.poll().await == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    pub async fn delete(mut self) {
        let channel = self.channel().await;
        let _ = channel
            .queue_delete(
                self.queue.clone().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
}

/// Publishes a job (persistent) to `image.general` of `prefix` on a short-lived connection.
pub async fn publish_job(prefix: &str, job: &Value) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        format!("{prefix}.jobs").into(),
        "image.general".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        job.to_string().as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// Messages waiting in a queue (passive declare).
pub async fn queue_depth(queue: &str) -> u32 {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    q.message_count()
}

pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}
