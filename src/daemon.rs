//! The daemon: connect to the engine and the broker, consume job queues, run jobs, publish
//! reports, acknowledge. Reconnects to the broker when the connection drops.
//!
//! Invariant: a job message is acknowledged only after its final report has been confirmed by
//! the broker; a dead-lettered message only after its copy in `<prefix>.dead` is confirmed.
//! Anything else is left unacknowledged, and the broker delivers it again.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{self, PublishError, Publisher, Topology};
use crate::config::Config;
use crate::inflight::{Admission, InFlight};
use crate::job::{InvalidJob, Job, parse_job};
use crate::lease::Lease;
use crate::pipeline::{DeliveryInfo, EventSender, Finished, JobContext, run_job};
use crate::report::{Report, Status, WorkerInfo, insert_time};

/// The caps this worker implements; others in `worker.caps` are only advertised.
pub const IMPLEMENTED_CAPS: &[&str] = &["image", "polaris_image"];

/// How the daemon is told to stop: `graceful` stops taking jobs and lets running ones finish
/// within the grace period; `immediate` (a second signal) returns them to the queue at once.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub graceful: CancellationToken,
    pub immediate: CancellationToken,
}

impl Shutdown {
    /// SIGTERM (systemd stop, Kubernetes eviction) and SIGINT: the first starts a graceful
    /// shutdown, the second ends it at once.
    pub fn from_signals() -> Self {
        let shutdown = Self::default();
        let s = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            for round in 0..2 {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if round == 0 {
                    tracing::info!(
                        "signal received: finishing running jobs, taking no new ones (signal again to stop at once)"
                    );
                    s.graceful.cancel();
                } else {
                    tracing::warn!(
                        "second signal: stopping now, running jobs go back to the queue"
                    );
                    s.immediate.cancel();
                }
            }
        });
        shutdown
    }
}

/// The `(cap, pool)` pairs this worker consumes.
pub fn consumed_queues(config: &Config) -> Vec<(String, String)> {
    let mut pools = vec![config.worker.group.clone()];
    for p in &config.worker.interest_list {
        if !pools.contains(p) {
            pools.push(p.clone());
        }
    }
    let mut out = Vec::new();
    for cap in config
        .worker
        .caps
        .iter()
        .filter(|c| IMPLEMENTED_CAPS.contains(&c.as_str()))
    {
        for pool in &pools {
            out.push((cap.clone(), pool.clone()));
        }
    }
    out
}

/// The publisher of the current broker connection. Jobs publish through it rather than through
/// the connection they started on, so a report survives a reconnect.
#[derive(Clone)]
pub struct PublisherSlot(Arc<watch::Sender<Option<Publisher>>>);

impl Default for PublisherSlot {
    fn default() -> Self {
        Self(Arc::new(watch::channel(None).0))
    }
}

impl PublisherSlot {
    fn set(&self, publisher: Option<Publisher>) {
        self.0.send_replace(publisher);
    }

    fn current(&self) -> Option<Publisher> {
        self.0.borrow().clone()
    }

    /// Publishes and waits for the broker's confirm, through whichever connection is up, trying
    /// again across reconnects until `stop`. A nack or an unroutable message is final.
    pub async fn publish_reliably(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
        stop: &CancellationToken,
    ) -> Result<(), PublishError> {
        let mut rx = self.0.subscribe();
        loop {
            let publisher = tokio::select! {
                p = rx.wait_for(Option::is_some) => p.ok().and_then(|p| p.clone()),
                _ = stop.cancelled() => None,
            };
            let Some(publisher) = publisher else {
                return Err(PublishError::Stopped);
            };
            match publisher
                .publish(exchange, routing_key, body, properties.clone(), mandatory)
                .await
            {
                Err(PublishError::Broker(e)) => {
                    tracing::warn!(error = %e, exchange, routing_key, "publish failed; trying again when the broker is back");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.cancelled() => return Err(PublishError::Stopped),
                    }
                }
                other => return other,
            }
        }
    }
}

struct Daemon {
    ctx: Arc<JobContext>,
    topology: Topology,
    queues: Vec<(String, String)>,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    shutdown: Shutdown,
    publisher: PublisherSlot,
    jobs: InFlight,
    events: EventSender,
    engine_up: watch::Receiver<bool>,
}

/// Runs the daemon until `shutdown` says stop.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let worker = WorkerInfo::from_config(&config.worker);
    let queues = consumed_queues(&config);
    anyhow::ensure!(
        !queues.is_empty(),
        "worker.caps {:?} holds none of the caps this worker implements ({:?})",
        config.worker.caps,
        IMPLEMENTED_CAPS
    );
    tracing::info!(
        worker_id = %worker.worker_id,
        app_label = %worker.app_label,
        queues = ?queues.iter().map(|(c, p)| format!("{c}.{p}")).collect::<Vec<_>>(),
        concurrency = config.worker.concurrency,
        "image-worker starting"
    );
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let http_stop = CancellationToken::new();
    if !config.http.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.http.listen)
            .await
            .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
        tracing::info!(address = %listener.local_addr()?, "http endpoint listening (/healthz, /readyz, /metrics)");
        tokio::spawn(crate::http::serve(
            listener,
            metrics.clone(),
            http_stop.clone(),
        ));
    }
    let _stop_http = http_stop.drop_guard();
    {
        let (metrics, graceful) = (metrics.clone(), shutdown.graceful.clone());
        tokio::spawn(async move {
            graceful.cancelled().await;
            metrics.set_draining();
        });
    }
    let Some(docker) = connect_engine(&config, &shutdown).await else {
        return Ok(());
    };
    metrics.set_engine_up(true);
    if let Some(every) = crate::systemd::watchdog_interval() {
        // Pings prove the runtime still schedules tasks; a wedged worker is restarted by systemd.
        let stop = shutdown.immediate.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => crate::systemd::notify("WATCHDOG=1"),
                }
            }
        });
    }
    let (engine_tx, engine_up) = watch::channel(true);
    tokio::spawn(watch_engine(
        docker.clone(),
        metrics.clone(),
        engine_tx,
        config.docker.ping_interval_s,
        shutdown.immediate.clone(),
    ));

    let publisher = PublisherSlot::default();
    let (events, events_rx) = mpsc::unbounded_channel();
    tokio::spawn(forward_events(
        publisher.clone(),
        Topology::new(&config.amqp.prefix).events_exchange(),
        events_rx,
    ));
    let daemon = Arc::new(Daemon {
        topology: Topology::new(&config.amqp.prefix),
        permits: Arc::new(Semaphore::new(config.worker.concurrency as usize)),
        ctx: Arc::new(JobContext {
            config,
            docker,
            worker,
            metrics,
            cache: Default::default(),
        }),
        queues,
        tracker: TaskTracker::new(),
        shutdown,
        publisher,
        jobs: InFlight::default(),
        events,
        engine_up,
    });
    let mut backoff = Duration::from_millis(500);
    loop {
        match daemon.clone().session().await {
            Ok(()) => break,
            Err(e) => {
                let wait = crate::pipeline::jittered(backoff);
                tracing::error!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "broker session ended; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = daemon.shutdown.graceful.cancelled() => {
                        // No broker to take jobs from: finish what runs (reports wait for a
                        // reconnect only while the grace period lasts).
                        daemon.wait_for_jobs().await;
                        break;
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    daemon.drain().await;
    tracing::info!("image-worker stopped");
    Ok(())
}

async fn connect_engine(config: &Config, shutdown: &Shutdown) -> Option<bollard::Docker> {
    let mut backoff = Duration::from_secs(1);
    loop {
        match crate::engine::connect(config.docker.host.as_deref()).await {
            Ok(docker) => {
                tracing::info!(api_version = %docker.client_version(), "connected to the Docker engine");
                return Some(docker);
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in_s = backoff.as_secs(), "Docker engine unreachable");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.graceful.cancelled() => return None,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Keeps `engine_up` true to the engine's answers: for /readyz, /metrics, and the consumers,
/// which stop while the engine is away.
async fn watch_engine(
    docker: bollard::Docker,
    metrics: Arc<crate::metrics::Metrics>,
    engine_up: watch::Sender<bool>,
    every_s: u64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(every_s.max(1)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(5), docker.ping()).await,
            Ok(Ok(_))
        );
        if up != metrics.engine_up() {
            if up {
                tracing::info!("the Docker engine answers again");
            } else {
                tracing::error!("the Docker engine does not answer");
            }
        }
        metrics.set_engine_up(up);
        engine_up.send_if_modified(|v| std::mem::replace(v, up) != up);
    }
}

/// Running events are best effort: published on the current connection, dropped without one.
async fn forward_events(
    publisher: PublisherSlot,
    exchange: String,
    mut rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    while let Some((key, body)) = rx.recv().await {
        if let Some(p) = publisher.current()
            && let Err(e) = p
                .publish(&exchange, &key, &body, BasicProperties::default(), false)
                .await
        {
            tracing::debug!(error = %e, "running event not published");
        }
    }
}

/// Where a delivery came from: the cap and the name of the job queue it was consumed from.
#[derive(Debug, Clone)]
struct Source {
    cap: String,
    queue: String,
}

/// The job consumers of one channel, and their tags. Each delivery comes with its [`Source`]:
/// the queue tells which cap the sender routed the job with.
struct Consumers {
    deliveries: futures_util::stream::SelectAll<
        futures_util::stream::BoxStream<'static, (Source, lapin::Result<Delivery>)>,
    >,
    tags: Vec<String>,
}

impl Daemon {
    fn worker_event(&self, event: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "event": event,
            "worker": self.ctx.worker,
            "jobs_in_flight": self.ctx.metrics.in_flight(),
            "concurrency": self.ctx.config.worker.concurrency,
            "engine_up": *self.engine_up.borrow(),
            "time": insert_time(chrono::Utc::now()),
        }))
        .expect("event serializes")
    }

    async fn consume(&self, channel: &lapin::Channel) -> lapin::Result<Consumers> {
        let mut consumers = Vec::new();
        let mut tags = Vec::new();
        for (cap, pool) in &self.queues {
            let tag = format!(
                "{}-{}-{cap}.{pool}-{}",
                self.ctx.worker.app_label,
                self.ctx.worker.worker_id,
                uuid::Uuid::new_v4().simple()
            );
            let queue = self.topology.job_queue(cap, pool);
            let consumer = channel
                .basic_consume(
                    queue.clone().into(),
                    tag.clone().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let source = Source {
                cap: cap.clone(),
                queue,
            };
            consumers.push(consumer.map(move |d| (source.clone(), d)).boxed());
            tags.push(tag);
        }
        Ok(Consumers {
            deliveries: futures_util::stream::select_all(consumers),
            tags,
        })
    }

    /// Cancels the consumers; deliveries the broker had already sent are returned to the queue.
    async fn stop_consuming(&self, channel: &lapin::Channel, mut consumers: Consumers) {
        for tag in &consumers.tags {
            let _ = channel
                .basic_cancel(tag.clone().into(), BasicCancelOptions::default())
                .await;
        }
        while let Ok(Some((_, Ok(d)))) =
            tokio::time::timeout(Duration::from_millis(200), consumers.deliveries.next()).await
        {
            let _ = d
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
    }

    /// One broker connection's life. `Ok` means a graceful shutdown was asked for.
    async fn session(self: Arc<Self>) -> anyhow::Result<()> {
        let config = &self.ctx.config;
        let connection = Arc::new(
            broker::connect_configured(
                config,
                &format!("image-worker {}", self.ctx.worker.app_label),
            )
            .await?,
        );
        let publisher = Publisher::open(&connection).await?;
        self.topology
            .declare(&publisher.channel(), &self.queues)
            .await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(config.worker.concurrency, BasicQosOptions::default())
            .await?;
        let control = self.control_consumer(&channel).await?;
        let mut control = control;
        self.publisher.set(Some(publisher.clone()));
        publisher
            .publish(
                &self.topology.events_exchange(),
                "worker.online",
                &self.worker_event("worker.online"),
                BasicProperties::default(),
                false,
            )
            .await?;
        self.ctx.metrics.set_broker_up(true);
        let mut engine_up = self.engine_up.clone();
        let mut consumers = if *engine_up.borrow_and_update() {
            Some(self.consume(&channel).await?)
        } else {
            tracing::warn!("the Docker engine does not answer: not taking jobs until it does");
            None
        };
        tracing::info!("connected to the broker; consuming");
        crate::systemd::notify("READY=1\nSTATUS=consuming jobs");
        let mut heartbeat = tokio::time::interval(Duration::from_secs(
            config.worker.heartbeat_interval_s.max(1),
        ));
        heartbeat.tick().await;

        let result = loop {
            let next_delivery = async {
                match consumers.as_mut() {
                    Some(c) => c.deliveries.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.graceful.cancelled() => break Ok(()),
                _ = heartbeat.tick() => {
                    if let Err(e) = publisher
                        .publish(&self.topology.events_exchange(), "worker.heartbeat", &self.worker_event("worker.heartbeat"), BasicProperties::default(), false)
                        .await
                    {
                        break Err(anyhow::Error::new(e).context("heartbeat not published"));
                    }
                }
                changed = engine_up.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let up = *engine_up.borrow_and_update();
                    match (up, consumers.take()) {
                        (false, Some(c)) => {
                            tracing::warn!("the Docker engine does not answer: not taking jobs until it does");
                            self.stop_consuming(&channel, c).await;
                        }
                        (true, None) => {
                            tracing::info!("the Docker engine is back: taking jobs again");
                            consumers = Some(self.consume(&channel).await?);
                        }
                        (_, c) => consumers = c,
                    }
                }
                message = control.next() => match message {
                    Some(Ok(d)) => self.handle_control(&d.data),
                    Some(Err(e)) => break Err(anyhow::Error::new(e).context("control consumer failed")),
                    None => break Err(anyhow::anyhow!("the broker closed the control consumer")),
                },
                delivery = next_delivery => match delivery {
                    Some((source, Ok(delivery))) => {
                        let permit = self.permits.clone().acquire_owned().await.expect("semaphore never closed");
                        let daemon = self.clone();
                        self.tracker.spawn(async move {
                            daemon.handle_delivery(delivery, source).await;
                            drop(permit);
                        });
                    }
                    Some((_, Err(e))) => break Err(anyhow::Error::new(e).context("consumer failed")),
                    None => break Err(anyhow::anyhow!("the broker closed the consumer")),
                },
            }
        };
        if result.is_ok() {
            crate::systemd::notify("STOPPING=1\nSTATUS=finishing running jobs");
            // Stop taking jobs; what the broker had sent but no job took goes back now.
            if let Some(c) = consumers.take() {
                self.stop_consuming(&channel, c).await;
            }
            self.wait_for_jobs().await;
            let _ = publisher
                .publish(
                    &self.topology.events_exchange(),
                    "worker.offline",
                    &self.worker_event("worker.offline"),
                    BasicProperties::default(),
                    false,
                )
                .await;
            self.publisher.set(None);
            let _ = channel
                .close(200, ShortString::from("worker stopping"))
                .await;
            let _ = connection
                .close(200, ShortString::from("worker stopping"))
                .await;
        }
        self.ctx.metrics.set_broker_up(false);
        result
    }

    /// An exclusive queue bound to the control exchange: this worker hears every cancel.
    async fn control_consumer(&self, channel: &lapin::Channel) -> lapin::Result<lapin::Consumer> {
        broker::private_consumer(channel, &self.topology.control_exchange(), "")
            .await
            .map(|(_, consumer)| consumer)
    }

    /// `{"action": "cancel", "uuid": "..."}`.
    fn handle_control(&self, body: &[u8]) {
        let message: serde_json::Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "control message is not JSON; ignored");
                return;
            }
        };
        match (
            message.get("action").and_then(|a| a.as_str()),
            message.get("uuid").and_then(|u| u.as_str()),
        ) {
            (Some("cancel"), Some(uuid)) => {
                if self.jobs.cancel(uuid) {
                    tracing::info!(job = %uuid, "cancel requested: stopping the running job");
                } else {
                    tracing::info!(job = %uuid, "cancel requested for a job not running here: it will be answered cancelled if it comes");
                }
            }
            _ => tracing::warn!(message = %message, "unknown control message; ignored"),
        }
    }

    /// Lets running jobs finish within the grace period; after it, or on a second signal,
    /// tells them to stop (their messages go back to the queue, unacknowledged).
    async fn wait_for_jobs(&self) {
        let running = self.ctx.metrics.in_flight();
        if running > 0 {
            tracing::info!(
                running,
                grace_s = self.ctx.config.worker.shutdown_grace_s,
                "waiting for running jobs"
            );
        }
        self.tracker.close();
        let grace = Duration::from_secs(self.ctx.config.worker.shutdown_grace_s);
        tokio::select! {
            _ = self.tracker.wait() => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(running = self.ctx.metrics.in_flight(), "grace period over: returning running jobs to the queue");
                self.shutdown.immediate.cancel();
            }
            _ = self.shutdown.immediate.cancelled() => {}
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        self.tracker.reopen();
    }

    async fn drain(&self) {
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }

    /// One delivery: dead-letter it, or run the job (once, however often it is delivered) and
    /// publish its report; acknowledge last.
    async fn handle_delivery(self: Arc<Self>, delivery: Delivery, source: Source) {
        let stop = self.shutdown.immediate.clone();
        let routing_key = delivery.routing_key.as_str().to_string();
        let input = match parse_job(&delivery.data, self.ctx.config.jobs.max_message_bytes) {
            Ok(input) => input,
            Err(rejection) => {
                let reason = rejection.to_string();
                tracing::warn!(routing_key = %routing_key, reason = %reason, bytes = delivery.data.len(), "message is not a job: dead-lettered");
                self.dead_letter(&delivery, &reason, None, &stop).await;
                return;
            }
        };
        let input = check_cap(input, &source);
        let (uuid, job_type) = match &input {
            Ok(job) => (job.uuid.clone(), job.job_type),
            Err(invalid) => (invalid.uuid.clone(), invalid.job_type),
        };
        let info = DeliveryInfo {
            redelivered: delivery.redelivered || broker::was_dead_lettered(&delivery.properties),
        };
        let body = delivery.data.clone();
        let cancel = match self.jobs.admit(&uuid, delivery) {
            Admission::Run(cancel) => cancel,
            Admission::Attached => {
                tracing::info!(job = %uuid, "job delivered again while it runs here: it is not started twice");
                return;
            }
            Admission::Cancelled(delivery) => {
                let cancelled = CancellationToken::new();
                cancelled.cancel();
                let finished = run_job(&self.ctx, input, info, None, &cancelled).await;
                let reply_to = delivery
                    .properties
                    .reply_to()
                    .as_ref()
                    .map(|r| r.as_str().to_string());
                let outcome = self
                    .publish_report(&finished, reply_to.iter().cloned().collect(), &stop)
                    .await;
                self.settle_reported(vec![*delivery], &outcome, &uuid, &stop)
                    .await;
                return;
            }
        };
        if info.redelivered
            && let Some(stored) = stored_final_report(&self.ctx.config.logs.root, &uuid)
        {
            tracing::info!(job = %uuid, status = stored.report.status.as_str(), "redelivered job was already reported: sending its report again, not running it");
            let outcome = self
                .publish_report(&stored, self.jobs.reply_to(&uuid), &stop)
                .await;
            self.settle_reported(self.jobs.finish(&uuid), &outcome, &uuid, &stop)
                .await;
            return;
        }

        self.ctx.metrics.job_started();
        let started = std::time::Instant::now();
        let lease_stop = CancellationToken::new();
        let lease = tokio::spawn(self.clone().keep_lease(
            uuid.clone(),
            routing_key,
            body,
            lease_stop.clone(),
        ));
        let finished = tokio::select! {
            f = run_job(&self.ctx, input, info, Some(self.events.clone()), &cancel) => f,
            _ = stop.cancelled() => {
                // Not acknowledged: the broker gives the job to another worker (or the lease
                // expires and does).
                lease_stop.cancel();
                self.jobs.finish(&uuid);
                self.ctx.metrics.job_finished(job_type.as_str(), "interrupted", started.elapsed());
                tracing::warn!(job = %uuid, "job interrupted by shutdown; it goes back to the queue");
                crate::joblog::append_line(
                    &self.ctx.config.logs.root,
                    &uuid,
                    "WARN attempt interrupted by the worker's shutdown; the job goes back to the queue",
                );
                return;
            }
        };
        lease_stop.cancel();
        let lease = lease.await.ok().flatten();
        self.ctx.metrics.job_finished(
            job_type.as_str(),
            finished.report.status.as_str(),
            started.elapsed(),
        );
        let outcome = self
            .publish_report(&finished, self.jobs.reply_to(&uuid), &stop)
            .await;
        self.settle_reported(self.jobs.finish(&uuid), &outcome, &uuid, &stop)
            .await;
        // A refused report ends the job too (its message went to the dead-letter queue): a
        // lease left to expire would only bring it back.
        let settled = match &outcome {
            Ok(()) => true,
            Err(e) => e.is_refusal(),
        };
        if let (true, Some(lease)) = (settled, lease)
            && let Some(p) = self.publisher.current()
            && let Err(e) = lease.release(&p).await
        {
            tracing::warn!(job = %uuid, error = %e, queue = lease.queue(), "lease not released; it expires by itself");
        }
        // After the report: the cache budget never delays one.
        self.ctx
            .cache
            .enforce(&self.ctx.docker, &self.ctx.config.cache)
            .await;
    }

    /// The final report: to the events exchange, then to each reply queue; confirmed. A report
    /// over [`MAX_REPORT_BYTES`], or one the broker refuses, goes out compacted (report.json
    /// keeps it whole); an error that is still a refusal means the broker will never take it.
    async fn publish_report(
        &self,
        finished: &Finished,
        reply_to: Vec<String>,
        stop: &CancellationToken,
    ) -> Result<(), PublishError> {
        let uuid = &finished.report.uuid;
        if finished.json.len() > MAX_REPORT_BYTES {
            tracing::warn!(job = %uuid, bytes = finished.json.len(), limit = MAX_REPORT_BYTES, "report too large: publishing it compacted (report.json keeps it whole)");
            let compact = compact_report_json(&finished.json);
            return self
                .publish_report_json(finished, &compact, &reply_to, stop)
                .await;
        }
        match self
            .publish_report_json(finished, &finished.json, &reply_to, stop)
            .await
        {
            Err(e) if e.is_refusal() => {
                tracing::error!(job = %uuid, error = %e, bytes = finished.json.len(), "the broker refused the report: publishing it compacted");
                let compact = compact_report_json(&finished.json);
                self.publish_report_json(finished, &compact, &reply_to, stop)
                    .await
            }
            other => other,
        }
    }

    async fn publish_report_json(
        &self,
        finished: &Finished,
        json: &[u8],
        reply_to: &[String],
        stop: &CancellationToken,
    ) -> Result<(), PublishError> {
        let report = &finished.report;
        let key = format!("job.{}.{}", report.job_type, report.status.as_str());
        let props =
            BasicProperties::default().with_correlation_id(ShortString::from(report.uuid.clone()));
        self.publisher
            .publish_reliably(
                &self.topology.events_exchange(),
                &key,
                json,
                props.clone(),
                false,
                stop,
            )
            .await?;
        for queue in reply_to {
            // Mandatory, so that a reply queue that does not exist (its submitter left, or a
            // typo) is said in the log; it is not an error: the event holds the report.
            match self
                .publisher
                .publish_reliably("", queue, json, props.clone(), true, stop)
                .await
            {
                Err(PublishError::Unroutable(_)) => {
                    tracing::warn!(job = %report.uuid, reply_to = %queue, "reply_to names no queue: the report went to the events exchange only");
                }
                other => other?,
            }
        }
        tracing::info!(job = %report.uuid, status = report.status.as_str(), "report published");
        Ok(())
    }

    /// Acknowledges a job's deliveries once its report is out. A report the broker refused even
    /// compacted would be refused on every redelivery: the message goes to the dead-letter queue
    /// with the reason instead of back to its queue, so it cannot loop.
    async fn settle_reported(
        &self,
        deliveries: Vec<Delivery>,
        outcome: &Result<(), PublishError>,
        uuid: &str,
        stop: &CancellationToken,
    ) {
        let refusal = match outcome {
            Err(e) if e.is_refusal() => e.to_string(),
            other => {
                let outcome = other.as_ref().map(|_| ()).map_err(|e| e.to_string());
                for d in &deliveries {
                    settle(d, outcome.clone(), "report", Some(uuid)).await;
                }
                return;
            }
        };
        let reason = format!(
            "the job ran but the broker refused its report, compacted too ({refusal}); report.json in its logs_dir holds it"
        );
        tracing::error!(job = %uuid, reason = %reason, "job message dead-lettered");
        for d in &deliveries {
            self.dead_letter(d, &reason, Some(uuid), stop).await;
        }
    }

    /// Copies a delivery (masked) to the dead-letter queue with `reason` in `x-error`, then
    /// acknowledges it; if the copy is not confirmed, the message goes back to its queue.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
        job: Option<&str>,
        stop: &CancellationToken,
    ) {
        let props = broker::dead_letter_properties(
            &delivery.properties,
            reason,
            delivery.routing_key.as_str(),
        );
        let copied = self
            .publisher
            .publish_reliably(
                "",
                &self.topology.dead_queue(),
                &dead_letter_body(&delivery.data),
                props,
                true,
                stop,
            )
            .await;
        self.ctx.metrics.dead_lettered();
        settle(
            delivery,
            copied.map_err(|e| e.to_string()),
            "dead-letter",
            job,
        )
        .await;
    }

    /// Hands a long job's message to a lease before the broker's consumer_timeout, and renews
    /// it until `stop`. Returns the lease, for release once the report is out.
    async fn keep_lease(
        self: Arc<Self>,
        uuid: String,
        routing_key: String,
        body: Vec<u8>,
        stop: CancellationToken,
    ) -> Option<Lease> {
        let jobs = &self.ctx.config.jobs;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(jobs.lease_after_s)) => {}
            _ = stop.cancelled() => return None,
        }
        let lease_len = Duration::from_secs(jobs.lease_s);
        let reply_to = self.jobs.reply_to(&uuid).into_iter().next();
        let lease = loop {
            if let Some(p) = self.publisher.current() {
                match Lease::take(
                    &p,
                    &self.topology,
                    &uuid,
                    &routing_key,
                    &body,
                    reply_to.as_deref(),
                    lease_len,
                )
                .await
                {
                    Ok(lease) => break lease,
                    Err(e) => tracing::warn!(job = %uuid, error = %e, "cannot take a lease yet"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.cancelled() => return None,
            }
        };
        for d in self.jobs.take_deliveries(&uuid) {
            settle(&d, Ok(()), "lease", Some(&uuid)).await;
        }
        tracing::info!(job = %uuid, queue = lease.queue(), lease_s = jobs.lease_s, "long job: its message is now held by a lease");
        loop {
            tokio::select! {
                _ = tokio::time::sleep(lease_len / 3) => {}
                _ = stop.cancelled() => return Some(lease),
            }
            match self.publisher.current() {
                Some(p) => {
                    if let Err(e) = lease.renew(&p).await {
                        tracing::warn!(job = %uuid, error = %e, "lease not renewed");
                    }
                }
                None => tracing::warn!(job = %uuid, "lease not renewed: no broker connection"),
            }
        }
    }
}

/// Largest report published as it is. RabbitMQ refuses messages over its `max_message_size`
/// (128 MiB in 3.x, 16 MiB from 4.0) and consumers of the API store each report as a record;
/// with the logs tail and `error.message` capped a report stays far below this, so only an
/// exceptional one (a huge echoed `data`) is compacted.
const MAX_REPORT_BYTES: usize = 4 * 1024 * 1024;

/// Fields of a compacted report kept only when their JSON is at most this long.
const COMPACT_FIELD_BYTES: usize = 4 * 1024;

/// A report small enough for any broker: every top-level field whose JSON is over
/// [`COMPACT_FIELD_BYTES`] is emptied (same type), `error.message` is cut to that size, and a
/// warning names what was left out. The input is the already masked report JSON.
fn compact_report_json(json: &[u8]) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut report)) = serde_json::from_slice(json) else {
        return serde_json::to_vec(
            &json!({"warnings": ["the report could not be read back to compact it"]}),
        )
        .expect("a value serializes");
    };
    let mut left_out = Vec::new();
    for (key, value) in report.iter_mut() {
        if key == "error" {
            if let Some(serde_json::Value::String(m)) = value.get_mut("message") {
                *m = crate::pipeline::cap_error_message(m, COMPACT_FIELD_BYTES);
            }
            continue;
        }
        let size = serde_json::to_vec(value).map_or(0, |v| v.len());
        if size > COMPACT_FIELD_BYTES {
            *value = match value {
                serde_json::Value::String(_) => serde_json::Value::String(String::new()),
                serde_json::Value::Array(_) => json!([]),
                serde_json::Value::Object(_) => json!({}),
                _ => serde_json::Value::Null,
            };
            left_out.push(format!("{key} ({size} bytes)"));
        }
    }
    let logs_dir = report
        .get("logs_dir")
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .to_string();
    let note = format!(
        "report compacted to fit the broker: left out {}; {logs_dir}/report.json holds it whole",
        left_out.join(", ")
    );
    match report.get_mut("warnings") {
        Some(serde_json::Value::Array(w)) => w.push(note.into()),
        _ => {
            report.insert("warnings".into(), json!([note]));
        }
    }
    serde_json::to_vec(&report).expect("a value serializes")
}

/// A job runs only from a queue of the cap its type needs: a `pull` routed to
/// `polaris_image.<pool>` (or a `polaris_build` to `image.<pool>`) reached a worker chosen for
/// another capability, so it fails with `invalid_job` rather than run there.
fn check_cap(input: Result<Job, InvalidJob>, source: &Source) -> Result<Job, InvalidJob> {
    let (job_type, uuid, raw) = match &input {
        Ok(job) => (job.job_type, &job.uuid, &job.raw),
        Err(invalid) => (invalid.job_type, &invalid.uuid, &invalid.raw),
    };
    if job_type.cap() == source.cap {
        return input;
    }
    Err(InvalidJob {
        uuid: uuid.clone(),
        job_type,
        raw: raw.clone(),
        message: format!(
            "a {} job needs cap {} but came from queue {} (cap {}): publish it with routing key {}.<pool>",
            job_type.as_str(),
            job_type.cap(),
            source.queue,
            source.cap,
            job_type.cap()
        ),
        kind: "invalid_job",
        retryable: false,
    })
}

/// The report of a job that was already reported (its `report.json` in this worker's logs
/// root), for a redelivered message: sent again rather than run again, marked `redelivered`.
fn stored_final_report(root: &std::path::Path, uuid: &str) -> Option<Finished> {
    let now = chrono::Utc::now();
    [now, now - chrono::Duration::days(31)]
        .iter()
        .find_map(|at| {
            let path = crate::joblog::logs_dir_for(root, uuid, *at).join("report.json");
            let json = std::fs::read(path).ok()?;
            let mut report: Report = serde_json::from_slice(&json).ok()?;
            if report.status == Status::Running {
                return None;
            }
            // This copy answers a redelivery, whatever the first delivery was.
            report.redelivered = true;
            let json = marked_redelivered(&json)?;
            Some(Finished { report, json })
        })
}

/// A stored report's JSON with `redelivered: true`; the rest as stored (already masked).
fn marked_redelivered(json: &[u8]) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(json).ok()?;
    value
        .as_object_mut()?
        .insert("redelivered".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&value).ok()
}

/// A message that is not a job, as kept in the dead-letter queue: byte for byte, except that
/// secrets are masked (it may be a job gone wrong, password included). A JSON body has its
/// secret-looking fields masked in the value tree; a body that does not parse (trailing garbage,
/// invalid UTF-8) is masked textually; when text that looks secret is left that no rule can mask
/// reliably (a secret field holding an object, YAML inside a string), the body is withheld and
/// replaced by a description of it. The headers (`x-error`...) are kept either way.
pub(crate) fn dead_letter_body(body: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut value) => {
            let before = value.clone();
            crate::secrets::SecretMask::default().mask_json(&mut value);
            if value == before {
                body.to_vec()
            } else {
                serde_json::to_vec(&value).unwrap_or_else(|_| withheld_body(body))
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            match crate::secrets::mask_text_fields(&text) {
                Some(masked) if masked == text => body.to_vec(),
                Some(masked) => masked.into_bytes(),
                None => withheld_body(body),
            }
        }
    }
}

/// What the dead-letter queue keeps of a message whose secrets cannot be masked reliably.
fn withheld_body(body: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "withheld": "the message is not valid JSON and holds text that looks secret but cannot be masked reliably; its body is not kept (see the x-error header for why it is not a job)",
        "bytes": body.len(),
    }))
    .expect("a description serializes")
}

async fn settle(delivery: &Delivery, outcome: Result<(), String>, what: &str, uuid: Option<&str>) {
    let job = uuid.unwrap_or("-");
    let result = match outcome {
        Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::error!(job, error = %e, "{what} not confirmed by the broker: returning the message to the queue");
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(job, error = %e, "cannot settle the delivery (its channel is gone); the broker delivers it again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_copies_keep_no_secret() {
        // Not a job but JSON: fields masked in the value tree.
        let json_body = br#"{"uuid": 5, "password": "s3cr3t-pw"}"#;
        let dead: serde_json::Value = serde_json::from_slice(&dead_letter_body(json_body)).unwrap();
        assert_eq!(dead, json!({"uuid": 5, "password": "********"}));
        // Nothing to mask: byte for byte, JSON or not.
        for body in [&b"not json"[..], b"{\"a\": 1} }{", b"{\"name\": \"x\xff\"}"] {
            assert_eq!(dead_letter_body(body), body);
        }
        // A job followed by garbage: masked as text.
        assert_eq!(
            dead_letter_body(br#"{"uuid": "u", "password": "s3cr3t-pw"} }{"#),
            br#"{"uuid": "u", "password": "********"} }{"#
        );
        // Invalid UTF-8 inside: masked as text (the invalid bytes become U+FFFD).
        assert_eq!(
            dead_letter_body(b"{\"name\": \"a\xffb\", \"password\": \"s3cr3t-pw\"}"),
            "{\"name\": \"a\u{fffd}b\", \"password\": \"********\"}".as_bytes()
        );
        // Cannot be masked reliably: withheld, described.
        let body = br#"{"yaml_content": "credentials: {password: s3cr3t-pw}"} x"#;
        let dead = dead_letter_body(body);
        assert!(!String::from_utf8_lossy(&dead).contains("s3cr3t-pw"));
        let dead: serde_json::Value = serde_json::from_slice(&dead).unwrap();
        assert_eq!(dead["bytes"], body.len());
        assert!(dead["withheld"].as_str().unwrap().contains("not kept"));
    }

    #[test]
    fn jobs_from_the_queue_of_another_cap_are_invalid() {
        let body = json!({
            "uuid": "1d252f72-181b-4af8-91d1-da34f248a004", "type": "pull", "group": "g",
            "name": "fixtures/basic", "push_url": "127.0.0.1:5000"
        })
        .to_string();
        let input = || parse_job(body.as_bytes(), 1 << 20).unwrap();
        let image = Source {
            cap: "image".into(),
            queue: "xpresso.jobs.image.general".into(),
        };
        assert!(check_cap(input(), &image).is_ok());
        let polaris = Source {
            cap: "polaris_image".into(),
            queue: "xpresso.jobs.polaris_image.general".into(),
        };
        let invalid = check_cap(input(), &polaris).unwrap_err();
        assert_eq!(invalid.kind, "invalid_job");
        assert!(!invalid.retryable);
        assert_eq!(
            invalid.message,
            "a pull job needs cap image but came from queue xpresso.jobs.polaris_image.general \
             (cap polaris_image): publish it with routing key image.<pool>"
        );
        assert_eq!(invalid.raw["name"], "fixtures/basic");
    }

    #[test]
    fn a_stored_report_sent_again_says_redelivered() {
        let stored = br#"{"uuid": "u", "redelivered": false, "data": {"password": "********"}}"#;
        let again: serde_json::Value =
            serde_json::from_slice(&marked_redelivered(stored).unwrap()).unwrap();
        assert_eq!(
            again,
            json!({"uuid": "u", "redelivered": true, "data": {"password": "********"}})
        );
        assert_eq!(marked_redelivered(b"[1]"), None);
    }

    #[test]
    fn compacted_reports_are_small_and_say_what_they_left_out() {
        let report = json!({
            "uuid": "u", "status": "failed", "logs_dir": "/logs/2026/03/images/u",
            "logs": "l".repeat(70_000),
            "data": {"padding": "p".repeat(5_000), "password": "********"},
            "jobs": ["/pyats/a_job.py"],
            "warnings": ["a broken manifest"],
            "error": {"kind": "build", "message": "m".repeat(16_000), "retryable": false},
            "size": 12,
        });
        let compact: serde_json::Value =
            serde_json::from_slice(&compact_report_json(&serde_json::to_vec(&report).unwrap()))
                .unwrap();
        assert_eq!(compact["logs"], "");
        assert_eq!(compact["data"], json!({}));
        assert_eq!(compact["jobs"], json!(["/pyats/a_job.py"]));
        assert_eq!(compact["size"], 12);
        assert_eq!(compact["error"]["kind"], "build");
        assert!(compact["error"]["message"].as_str().unwrap().len() <= COMPACT_FIELD_BYTES);
        assert_eq!(
            compact["warnings"],
            json!([
                "a broken manifest",
                "report compacted to fit the broker: left out data (5036 bytes), logs (70002 bytes); /logs/2026/03/images/u/report.json holds it whole"
            ])
        );
        assert!(serde_json::to_vec(&compact).unwrap().len() < 3 * COMPACT_FIELD_BYTES);
    }

    #[test]
    fn refusals_are_told_from_outages() {
        assert!(PublishError::Nacked.is_refusal());
        assert!(PublishError::Refused("406".into()).is_refusal());
        assert!(!PublishError::Stopped.is_refusal());
        assert!(!PublishError::Unroutable("x".into()).is_refusal());
    }
}
