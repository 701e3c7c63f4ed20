//! One job from start to report: the steps every job type shares (log, timeout, report, masking),
//! around the type's own work (`pull`, `build`, `polaris_build`), and the steps several types
//! share (credentials, inspect, discover).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ImageInspect;
use chrono::Utc;
use serde_json::{Map, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::Config;
use crate::engine::EngineError;
use crate::job::{InvalidJob, Job, JobType};
use crate::joblog::JobLog;
use crate::report::{
    ContainerDetails, ErrorInfo, Meta, Progress, Report, RunningEvent, Status, WorkerInfo,
    insert_time, record_date,
};
use crate::secrets::SecretMask;

/// What every job needs from the worker.
pub struct JobContext {
    pub config: Config,
    pub docker: Docker,
    pub worker: WorkerInfo,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub cache: crate::cache::ImageCache,
}

/// Why a job failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub kind: &'static str,
    pub message: String,
    pub retryable: bool,
}

impl JobError {
    pub fn new(kind: &'static str, message: impl Into<String>, retryable: bool) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable,
        }
    }
}

impl From<EngineError> for JobError {
    fn from(e: EngineError) -> Self {
        Self::new(e.kind.as_str(), e.message, e.kind.retryable())
    }
}

/// Runs a registry operation, trying again with capped exponential backoff and jitter when it
/// failed transiently (unreachable, 5xx, 429); never when it cannot succeed (401/403, unknown
/// manifest, bad reference). Each try is in the job log.
pub async fn with_registry_retries<T, F, Fut>(
    ctx: &JobContext,
    log: &JobLog,
    what: &str,
    mut op: F,
) -> Result<T, EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EngineError>>,
{
    let mut delay = Duration::from_millis(ctx.config.jobs.retry_backoff_ms.max(1));
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(e)
                if attempt <= ctx.config.jobs.registry_retries
                    && matches!(
                        e.kind,
                        crate::engine::EngineErrorKind::RegistryUnreachable
                            | crate::engine::EngineErrorKind::RegistryError
                    ) =>
            {
                let wait = jittered(delay);
                log.warn(format!(
                    "{what}: try {attempt} failed ({}): {}; trying again in {} ms",
                    e.kind.as_str(),
                    e.message,
                    wait.as_millis()
                ));
                ctx.metrics.retried();
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(30));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Pushes `repository:tag` with `pushing` events and registry retries; returns the digest the
/// registry gave. Shared by the mirror push of a pull and the push of a build.
pub async fn push(
    ctx: &JobContext,
    log: &JobLog,
    events: &JobEvents,
    repository: &str,
    tag: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<Option<String>, JobError> {
    let registry = crate::reference::registry_host(repository);
    events.running("pushing", Progress::default());
    let creds = crate::engine::credentials(registry, username, password);
    let what = format!("pushing {repository}:{tag}");
    let (digest, pushed) = with_registry_retries(ctx, log, &what, || {
        crate::engine::push_image(
            &ctx.docker,
            repository,
            tag,
            creds.clone(),
            |p| events.running("pushing", p),
            |line| log.info(line),
        )
    })
    .await
    .map_err(|e| {
        let mut err = JobError::from(e);
        err.message = format!("{what} failed: {}", err.message);
        err
    })?;
    ctx.metrics.add_bytes_pushed(pushed.current);
    Ok(digest)
}

/// `d` plus up to half of it again, so workers that failed together do not retry together.
pub fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64((nanos % 1000) as f64 / 2000.0)
}

/// An event leaving a job: routing key and body, for whoever publishes (the broker, or nobody).
pub type EventSender = UnboundedSender<(String, Vec<u8>)>;

/// Sends a job's `running` events, at most one a second per job: phase changes go out at
/// once; progress within the second is held and the latest is sent when the second is over, so
/// the last figures of a burst (an engine that reports a whole layer at once) are never lost.
pub struct JobEvents {
    sender: Option<EventSender>,
    uuid: String,
    job_type: &'static str,
    worker_id: String,
    state: std::sync::Arc<Mutex<Throttle>>,
}

#[derive(Default)]
struct Throttle {
    last_sent: Option<Instant>,
    phase: String,
    pending: Option<Vec<u8>>,
    flush_scheduled: bool,
    /// The job is over: nothing held is sent after its report.
    closed: bool,
}

const EVENT_INTERVAL: Duration = Duration::from_secs(1);

impl JobEvents {
    pub fn new(
        sender: Option<EventSender>,
        uuid: &str,
        job_type: JobType,
        worker_id: &str,
    ) -> Self {
        Self {
            sender,
            uuid: uuid.to_string(),
            job_type: job_type.as_str(),
            worker_id: worker_id.to_string(),
            state: Default::default(),
        }
    }

    pub fn running(&self, phase: &str, progress: Progress) {
        let Some(sender) = &self.sender else { return };
        let event = RunningEvent {
            uuid: self.uuid.clone(),
            status: Status::Running,
            job_type: self.job_type.to_string(),
            phase: phase.to_string(),
            progress,
            worker_id: self.worker_id.clone(),
            date_updated: record_date(Utc::now()),
        };
        let Ok(body) = serde_json::to_vec(&event) else {
            return;
        };
        let key = format!("job.{}.running", self.job_type);
        let mut state = self.state.lock().unwrap();
        if state.closed {
            return;
        }
        let due = state
            .last_sent
            .is_none_or(|t| t.elapsed() >= EVENT_INTERVAL);
        if state.phase != phase || due {
            state.phase = phase.to_string();
            state.last_sent = Some(Instant::now());
            state.pending = None;
            let _ = sender.send((key, body));
            return;
        }
        state.pending = Some(body);
        if !state.flush_scheduled {
            state.flush_scheduled = true;
            let wait = EVENT_INTERVAL
                .saturating_sub(state.last_sent.map_or(Duration::ZERO, |t| t.elapsed()));
            let shared = self.state.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let pending = {
                    let mut state = shared.lock().unwrap();
                    state.flush_scheduled = false;
                    let pending = state.pending.take().filter(|_| !state.closed);
                    if pending.is_some() {
                        state.last_sent = Some(Instant::now());
                    }
                    pending
                };
                if let Some(body) = pending {
                    let _ = sender.send((key, body));
                }
            });
        }
    }
}

impl Drop for JobEvents {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap();
        state.closed = true;
        state.pending = None;
    }
}

/// What the broker tells us about a delivery.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliveryInfo {
    pub redelivered: bool,
}

/// A finished job: the report and its masked JSON, ready to publish.
pub struct Finished {
    pub report: Report,
    pub json: Vec<u8>,
}

/// Most bytes of a report's `error.message`. A failed build quotes its last output lines, and an
/// engine error can quote a whole response: the message says what went wrong, `job.log` has
/// everything, and the report stays one reasonable AMQP message.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 16 * 1024;

/// `message` within `max` bytes: its beginning (what failed) and its end (a build's last lines)
/// around a note of what was left out; unchanged when it fits.
pub fn cap_error_message(message: &str, max: usize) -> String {
    if message.len() <= max {
        return message.to_string();
    }
    let floor = |mut i: usize| {
        while !message.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let ceil = |mut i: usize| {
        while !message.is_char_boundary(i) {
            i += 1;
        }
        i
    };
    // A quarter for the head, the rest for the tail, less room for the note.
    let head = floor(max / 4);
    let tail = ceil(message.len() - (max - max / 4).saturating_sub(96));
    format!(
        "{}\n[... {} bytes left out; job.log has the whole message ...]\n{}",
        &message[..head],
        tail - head,
        &message[tail..]
    )
}

/// Runs one job (or reports why it is invalid) and returns its final report.
pub async fn run_job(
    ctx: &JobContext,
    input: Result<Job, InvalidJob>,
    delivery: DeliveryInfo,
    events: Option<EventSender>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Finished {
    let started = Utc::now();
    let (uuid, job_type, raw) = match &input {
        Ok(job) => (job.uuid.clone(), job.job_type, job.raw.clone()),
        Err(invalid) => (invalid.uuid.clone(), invalid.job_type, invalid.raw.clone()),
    };
    let mask = job_secrets(ctx, &input);
    let mut log_error = None;
    let log = match JobLog::create(
        &ctx.config.logs.root,
        &uuid,
        started,
        mask.clone(),
        ctx.config.logs.tail_lines,
    ) {
        Ok(log) => log,
        Err(e) => {
            let log = JobLog::without_file(
                &ctx.config.logs.root,
                &uuid,
                started,
                mask.clone(),
                ctx.config.logs.tail_lines,
            );
            log.error(format!(
                "cannot write the job log under {}: {e}",
                log.dir().display()
            ));
            log_error = Some(format!(
                "the job log could not be written under {}: {e}",
                log.dir().display()
            ));
            log
        }
    };
    let events = JobEvents::new(events, &uuid, job_type, &ctx.worker.worker_id);
    let mut report = base_report(ctx, &uuid, job_type, &raw, &input, &log, started, delivery);
    report.warnings.extend(log_error);

    log.info(format!(
        "{} job {uuid} started on worker {} ({}){}",
        job_type.as_str(),
        ctx.worker.app_label,
        ctx.worker.worker_id,
        if delivery.redelivered {
            ", redelivered by the broker"
        } else {
            ""
        }
    ));
    let outcome = match &input {
        Err(invalid) => Err(JobError::new(
            invalid.kind,
            invalid.message.clone(),
            invalid.retryable,
        )),
        Ok(job) => {
            let limit = job.timeout(ctx.config.jobs.default_timeout_s);
            // Dropping the steps' future drops the engine requests, which stops the engine's work.
            tokio::select! {
                result = tokio::time::timeout(limit, run_steps(ctx, job, &log, &events, &mut report)) => match result {
                    Ok(result) => result,
                    Err(_) => Err(JobError::new(
                        "timeout",
                        format!("the job did not finish within {} s", limit.as_secs()),
                        true,
                    )),
                },
                _ = cancel.cancelled() => Err(JobError::new("cancelled", "the job was cancelled", false)),
            }
        }
    };
    let finished = Utc::now();
    match outcome {
        Ok(()) => {
            report.status = Status::Successful;
            log.info(format!(
                "job successful in {:.1} s",
                (finished - started).num_milliseconds() as f64 / 1000.0
            ));
        }
        Err(e) if e.kind == "cancelled" => {
            report.status = Status::Cancelled;
            log.warn("job cancelled");
            report.error = Some(ErrorInfo {
                kind: e.kind.to_string(),
                message: cap_error_message(&e.message, MAX_ERROR_MESSAGE_BYTES),
                retryable: false,
            });
        }
        Err(e) => {
            report.status = Status::Failed;
            let message = mask.mask(&e.message);
            log.error(format!("job failed ({}): {message}", e.kind));
            let message = cap_error_message(&message, MAX_ERROR_MESSAGE_BYTES);
            report.error = Some(ErrorInfo {
                kind: e.kind.to_string(),
                message,
                retryable: e.retryable,
            });
        }
    }
    if report.image_held
        && let Some(id) = &report.image_id
    {
        ctx.cache.release(id);
    }
    report.date_updated = record_date(finished);
    report.finished_at = Some(insert_time(finished));
    report.logs = log.tail();
    let json = masked_json(&report, &mask);
    if let Err(e) = log.write_report(&json) {
        tracing::warn!(job = %uuid, error = %e, "cannot write report.json");
    }
    log.close();
    Finished { report, json }
}

async fn run_steps(
    ctx: &JobContext,
    job: &Job,
    log: &JobLog,
    events: &JobEvents,
    report: &mut Report,
) -> Result<(), JobError> {
    match job.job_type {
        JobType::Pull => crate::pull::run_pull(ctx, job, log, events, report).await,
        JobType::Build => crate::build::pyats::run_build(ctx, job, log, events, report).await,
        JobType::PolarisBuild => {
            crate::build::polaris::run_polaris_build(ctx, job, log, events, report).await
        }
    }
}

/// The report as JSON with every secret masked: values of secret fields anywhere, and the
/// job's secrets inside any string. Masking the value tree (not the text) keeps it valid JSON.
fn masked_json(report: &Report, mask: &SecretMask) -> Vec<u8> {
    let mut value = serde_json::to_value(report).expect("a report serializes");
    mask.mask_json(&mut value);
    serde_json::to_vec(&value).expect("a value serializes")
}

/// Every secret this job could print: its password, and the worker's own registry passwords.
fn job_secrets(ctx: &JobContext, input: &Result<Job, InvalidJob>) -> SecretMask {
    let mut mask = SecretMask::default();
    let raw = match input {
        Ok(job) => &job.raw,
        Err(invalid) => &invalid.raw,
    };
    collect_secret_values(&Value::Object(raw.clone()), &mut mask);
    // `user:password@host` in a push_url (refused by validation, but echoed in the report).
    if let Some(Value::String(push_url)) = raw.get("push_url")
        && let Some((userinfo, _)) = push_url.split('/').next().unwrap_or("").rsplit_once('@')
    {
        mask.add(
            userinfo
                .split_once(':')
                .map_or(userinfo, |(_, p)| p)
                .to_string(),
        );
    }
    // A build file's repository credentials, ssh keys and proxy passwords: masked everywhere,
    // the echoed `yaml_content` included.
    if let Some(Value::String(yaml)) = raw.get("yaml_content")
        && yaml.len() <= ctx.config.build.max_yaml_bytes
    {
        for secret in crate::build::file::secret_values(yaml) {
            mask.add(secret);
        }
    }
    for creds in ctx.config.registry.credentials.values() {
        if let Ok(Some(p)) = creds.resolve_password() {
            mask.add(p);
        }
    }
    if let Ok(url) = ctx.config.amqp_url()
        && let Some(password) = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, p)| p.to_string())
    {
        mask.add(password);
    }
    mask
}

fn collect_secret_values(value: &Value, mask: &mut SecretMask) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) if crate::secrets::is_secret_field(k) => mask.add(s.clone()),
                    _ => collect_secret_values(v, mask),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_secret_values(v, mask)),
        _ => {}
    }
}

#[allow(clippy::too_many_arguments)]
fn base_report(
    ctx: &JobContext,
    uuid: &str,
    job_type: JobType,
    raw: &Map<String, Value>,
    input: &Result<Job, InvalidJob>,
    log: &JobLog,
    started: chrono::DateTime<Utc>,
    delivery: DeliveryInfo,
) -> Report {
    let text = |key: &str| {
        raw.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (name, tag, group, push_url) = match input {
        Ok(job) => (
            job.name.clone(),
            job.tag.clone(),
            job.group.clone(),
            job.push_url.clone(),
        ),
        Err(_) => (text("name"), text("tag"), text("group"), text("push_url")),
    };
    let mut data = raw.clone();
    // A build file too large to be read is too large to be scanned for its secrets: it is not
    // echoed at all.
    let yaml_limit = ctx.config.build.max_yaml_bytes;
    let mut yaml_content = text("yaml_content");
    if yaml_content.len() > yaml_limit {
        yaml_content = format!(
            "<not shown: {} bytes, over the {yaml_limit}-byte limit>",
            yaml_content.len()
        );
        data.insert("yaml_content".into(), Value::String(yaml_content.clone()));
    }
    let has_credentials = raw
        .get("username")
        .and_then(Value::as_str)
        .is_some_and(|u| !u.is_empty());
    data.insert("default_credential".into(), Value::Bool(!has_credentials));
    let logs_dir = log.dir().display().to_string();
    Report {
        uuid: uuid.to_string(),
        name,
        tag,
        status: Status::Running,
        record_type: job_type.report_type().to_string(),
        custom: job_type != JobType::Pull,
        yaml_content,
        container_details: ContainerDetails::default(),
        size: 0,
        virtual_size: 0,
        image_id: None,
        push_url,
        date_created: record_date(started),
        date_updated: record_date(started),
        nfs_path: None,
        group,
        is_deleted: false,
        image: None,
        data,
        meta: Meta {
            worker: ctx.worker.clone(),
            logs_dir: logs_dir.clone(),
            container_details: ContainerDetails::default(),
        },
        jobs: Vec::new(),
        manifests: Vec::new(),
        logs_dir,
        worker: ctx.worker.clone(),
        logs: String::new(),
        tags: Vec::new(),
        deleted: false,
        digest: None,
        error: None,
        warnings: Vec::new(),
        discovery: None,
        job_type: job_type.as_str().to_string(),
        redelivered: delivery.redelivered,
        started_at: insert_time(started),
        finished_at: None,
        image_held: false,
    }
}

/// The job's credentials when it brings some, else the worker's for that registry.
pub(crate) fn registry_credentials(
    ctx: &JobContext,
    job: &Job,
    registry: &str,
) -> Result<(Option<String>, Option<String>), JobError> {
    if job.username.is_some() {
        return Ok((job.username.clone(), job.password.clone()));
    }
    match ctx.config.registry.credentials.get(registry) {
        Some(creds) => {
            let password = creds.resolve_password().map_err(|e| {
                JobError::new(
                    "internal",
                    format!("worker credentials for {registry}: {e}"),
                    false,
                )
            })?;
            Ok((Some(creds.username.clone()), password))
        }
        None => Ok((None, None)),
    }
}

/// Fills the record's size, id and container details from the engine's inspect.
/// Fills the record from the engine's inspect, and holds the image in the worker's cache until
/// the job ends (no eviction takes an image a job is using).
pub(crate) fn apply_inspect(ctx: &JobContext, report: &mut Report, inspect: &ImageInspect) {
    report.image_id = inspect.id.clone();
    report.size = inspect.size.unwrap_or(0);
    if let Some(id) = &report.image_id
        && !report.image_held
    {
        ctx.cache.hold(id, report.size.max(0) as u64);
        report.image_held = true;
    }
    // API 1.41 reports VirtualSize equal to Size for local images; later APIs dropped it.
    report.virtual_size = report.size;
    let mut detail = Map::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            detail.insert(k.to_string(), Value::String(v));
        }
    };
    put("os", inspect.os.clone());
    put("architecture", inspect.architecture.clone());
    put("created", inspect.created.clone());
    let config = inspect.config.as_ref();
    put(
        "workspace",
        config.and_then(|c| c.env.as_ref()).and_then(|env| {
            env.iter()
                .find_map(|e| e.strip_prefix("WORKSPACE=").map(str::to_string))
        }),
    );
    if let Some(layers) = inspect.root_fs.as_ref().and_then(|r| r.layers.as_ref()) {
        detail.insert("layers".into(), Value::from(layers.len()));
    }
    report.container_details = ContainerDetails { detail };
    report.meta.container_details = report.container_details.clone();
}

/// Discovers the image's jobs and manifests with the configured rules, plus `extra` (a build
/// file's `jobfiles`: its `match` replaces the configured one, its globs and paths add to them).
pub(crate) async fn discover(
    ctx: &JobContext,
    log: &JobLog,
    events: &JobEvents,
    report: &mut Report,
    inspect: &ImageInspect,
    extra: Option<&crate::discovery::JobRules>,
) -> Result<(), JobError> {
    let image_id = inspect.id.as_deref().unwrap_or_default();
    events.running("discovering", Progress::default());
    let started = Instant::now();
    let mut options = ctx.config.discovery.options();
    if let Some(extra) = extra {
        if extra.r#match.is_some() {
            options.rules.r#match = extra.r#match.clone();
        }
        options.rules.glob.extend(extra.glob.iter().cloned());
        options.rules.paths.extend(extra.paths.iter().cloned());
    }
    let found = crate::discovery::discover_image(&ctx.docker, image_id, &options)
        .await
        .map_err(|e| JobError::new("discovery", format!("discovery failed: {e}"), true))?;
    let elapsed = started.elapsed();
    log.info(format!(
        "discovery ({} source, root {}): {} job files, {} manifests, {} warnings, {} files scanned in {} ms",
        found.source,
        found.root,
        found.jobs.len(),
        found.manifests.len(),
        found.warnings.len(),
        found.files_scanned,
        elapsed.as_millis()
    ));
    for warning in &found.warnings {
        log.warn(format!("discovery: {warning}"));
    }
    report.set_discovery(found, elapsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_capped_keeping_head_and_tail() {
        assert_eq!(cap_error_message("short", 100), "short");
        // A failed build of 6 MB of output: what failed, and its last lines.
        let message = format!(
            "the build of x failed: step 3\nlast build output:\n{}\nlast line",
            "o".repeat(6_000_000)
        );
        let capped = cap_error_message(&message, MAX_ERROR_MESSAGE_BYTES);
        assert!(capped.len() <= MAX_ERROR_MESSAGE_BYTES, "{}", capped.len());
        assert!(
            capped.len() > MAX_ERROR_MESSAGE_BYTES - 200,
            "{}",
            capped.len()
        );
        assert!(capped.starts_with("the build of x failed: step 3\nlast build output:\nooo"));
        assert!(capped.ends_with("ooo\nlast line"));
        // 16384 bytes: 4096 of head, 12192 of tail, the note between.
        let note = format!(
            "\n[... {} bytes left out; job.log has the whole message ...]\n",
            message.len() - 4096 - 12192
        );
        assert_eq!(capped.len(), 4096 + note.len() + 12192);
        assert_eq!(&capped[4096..4096 + note.len()], note);
        // Never inside a character.
        let wide = "é".repeat(300);
        assert_eq!(
            cap_error_message(&wide, 201),
            format!(
                "{}\n[... 496 bytes left out; job.log has the whole message ...]\n{}",
                "é".repeat(25),
                "é".repeat(27)
            )
        );
    }
}
