//! The daemon: connect to the engine and the broker, consume job queues, run jobs, publish
//! reports, acknowledge. Reconnects to the broker when the connection drops.
//!
//! Invariant: a job message is acknowledged only after its final report has been confirmed by
//! the broker; a dead-lettered message only after its copy in `<prefix>.dead` is confirmed.
//! Anything else is left unacknowledged, and the broker delivers it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{self, Publisher, Topology};
use crate::config::Config;
use crate::job::parse_job;
use crate::pipeline::{DeliveryInfo, JobContext, run_job};
use crate::report::{WorkerInfo, insert_time};

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

struct Daemon {
    ctx: Arc<JobContext>,
    topology: Topology,
    queues: Vec<(String, String)>,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
    shutdown: Shutdown,
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
    let Some(docker) = connect_engine(&config, &shutdown).await else {
        return Ok(());
    };
    let daemon = Daemon {
        topology: Topology::new(&config.amqp.prefix),
        permits: Arc::new(Semaphore::new(config.worker.concurrency as usize)),
        ctx: Arc::new(JobContext {
            config,
            docker,
            worker,
        }),
        queues,
        tracker: TaskTracker::new(),
        in_flight: Arc::new(AtomicUsize::new(0)),
        shutdown,
    };
    let mut backoff = Duration::from_millis(500);
    loop {
        match daemon.session().await {
            Ok(()) => break,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "broker session ended; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = daemon.shutdown.graceful.cancelled() => break,
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

impl Daemon {
    fn worker_event(&self, event: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "event": event,
            "worker": self.ctx.worker,
            "jobs_in_flight": self.in_flight.load(Ordering::Relaxed),
            "concurrency": self.ctx.config.worker.concurrency,
            "time": insert_time(chrono::Utc::now()),
        }))
        .expect("event serializes")
    }

    /// One broker connection's life. `Ok` means a graceful shutdown was asked for.
    async fn session(&self) -> anyhow::Result<()> {
        let config = &self.ctx.config;
        let url = config.amqp_url()?;
        let connection =
            broker::connect(&url, &format!("image-worker {}", self.ctx.worker.app_label))
                .await
                .with_context(|| {
                    format!(
                        "cannot connect to {}",
                        crate::secrets::mask_url_credentials(&url)
                    )
                })?;
        let publisher = Publisher::open(&connection).await?;
        self.topology
            .declare(publisher.channel(), &self.queues)
            .await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(config.worker.concurrency, BasicQosOptions::default())
            .await?;
        let mut consumers = Vec::new();
        let mut tags = Vec::new();
        for (cap, pool) in &self.queues {
            let queue = self.topology.job_queue(cap, pool);
            let tag = format!(
                "{}-{}-{cap}.{pool}",
                self.ctx.worker.app_label, self.ctx.worker.worker_id
            );
            let consumer = channel
                .basic_consume(
                    queue.into(),
                    tag.clone().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push(consumer);
            tags.push(tag);
        }
        let mut deliveries = futures_util::stream::select_all(consumers);

        let (events_tx, mut events_rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let events_publisher = publisher.clone();
        let events_exchange = self.topology.events_exchange();
        let forwarder = tokio::spawn(async move {
            while let Some((key, body)) = events_rx.recv().await {
                if let Err(e) = events_publisher
                    .publish(
                        &events_exchange,
                        &key,
                        &body,
                        BasicProperties::default(),
                        false,
                    )
                    .await
                {
                    tracing::debug!(error = %e, "running event not published");
                }
            }
        });

        publisher
            .publish(
                &self.topology.events_exchange(),
                "worker.online",
                &self.worker_event("worker.online"),
                BasicProperties::default(),
                false,
            )
            .await?;
        tracing::info!("connected to the broker; consuming");
        let mut heartbeat = tokio::time::interval(Duration::from_secs(
            config.worker.heartbeat_interval_s.max(1),
        ));
        heartbeat.tick().await;

        let result = loop {
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
                delivery = deliveries.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let permit = self.permits.clone().acquire_owned().await.expect("semaphore never closed");
                        let ctx = self.ctx.clone();
                        let publisher = publisher.clone();
                        let topology = self.topology.clone();
                        let events = events_tx.clone();
                        let abort = self.shutdown.immediate.clone();
                        let in_flight = self.in_flight.clone();
                        in_flight.fetch_add(1, Ordering::Relaxed);
                        self.tracker.spawn(async move {
                            handle_delivery(&ctx, &publisher, &topology, delivery, events, abort).await;
                            in_flight.fetch_sub(1, Ordering::Relaxed);
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => break Err(anyhow::Error::new(e).context("consumer failed")),
                    None => break Err(anyhow::anyhow!("the broker closed the consumer")),
                },
            }
        };
        if result.is_ok() {
            // Stop taking jobs; deliveries prefetched but not started go back when the channel closes.
            for tag in tags {
                let _ = channel
                    .basic_cancel(tag.into(), BasicCancelOptions::default())
                    .await;
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
            let _ = channel
                .close(200, ShortString::from("worker stopping"))
                .await;
            let _ = connection
                .close(200, ShortString::from("worker stopping"))
                .await;
        }
        drop(events_tx);
        forwarder.abort();
        result
    }

    /// Lets running jobs finish within the grace period; after it, or on a second signal,
    /// tells them to stop (their messages go back to the queue, unacknowledged).
    async fn wait_for_jobs(&self) {
        let running = self.in_flight.load(Ordering::Relaxed);
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
                tracing::warn!(running = self.in_flight.load(Ordering::Relaxed), "grace period over: returning running jobs to the queue");
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
}

/// One delivery: dead-letter it, or run the job and publish its report; ack last.
async fn handle_delivery(
    ctx: &JobContext,
    publisher: &Publisher,
    topology: &Topology,
    delivery: Delivery,
    events: crate::pipeline::EventSender,
    abort: CancellationToken,
) {
    let source = delivery.routing_key.as_str().to_string();
    let input = match parse_job(&delivery.data, ctx.config.jobs.max_message_bytes) {
        Err(rejection) => {
            let reason = rejection.to_string();
            tracing::warn!(routing_key = %source, reason = %reason, bytes = delivery.data.len(), "message is not a job: dead-lettered");
            let props =
                BasicProperties::default().with_headers(broker::error_headers(&reason, &source));
            let outcome = publisher
                .publish("", &topology.dead_queue(), &delivery.data, props, true)
                .await;
            settle(&delivery, outcome.map_err(|e| e.to_string()), "dead-letter").await;
            return;
        }
        Ok(input) => input,
    };
    let info = DeliveryInfo {
        redelivered: delivery.redelivered,
    };
    let finished = tokio::select! {
        f = run_job(ctx, input, info, Some(events)) => f,
        _ = abort.cancelled() => {
            // Not acknowledged: the broker gives the job to another worker.
            tracing::warn!(routing_key = %source, "job interrupted by shutdown; returned to the queue");
            return;
        }
    };
    let report = &finished.report;
    let key = format!("job.{}.{}", report.job_type, report.status.as_str());
    let props =
        BasicProperties::default().with_correlation_id(ShortString::from(report.uuid.clone()));
    let mut outcome = publisher
        .publish(
            &topology.events_exchange(),
            &key,
            &finished.json,
            props.clone(),
            false,
        )
        .await
        .map_err(|e| e.to_string());
    if outcome.is_ok()
        && let Some(reply_to) = delivery.properties.reply_to().as_ref()
    {
        // The reply queue may be gone (the submitter left): the event above still holds the report.
        if let Err(e) = publisher
            .publish("", reply_to.as_str(), &finished.json, props, false)
            .await
        {
            tracing::warn!(job = %report.uuid, error = %e, "reply not delivered");
            outcome = Err(e.to_string());
        }
    }
    tracing::info!(job = %report.uuid, status = report.status.as_str(), "report published");
    settle(&delivery, outcome, "report").await;
}

async fn settle(delivery: &Delivery, outcome: Result<(), String>, what: &str) {
    let result = match outcome {
        Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::error!(error = %e, "{what} not confirmed by the broker: returning the message to the queue");
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
        tracing::warn!(error = %e, "cannot settle the delivery; the broker will deliver it again");
    }
}
