//! `image-worker submit`: publish a job to the broker and, with `--wait`, print its report.

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::{Map, Value};

use crate::broker::{self, Publisher, Topology};
use crate::config::Config;
use crate::job::JobType;

/// How a submission ended.
pub enum Submitted {
    /// Published; not waiting.
    Queued { uuid: String },
    /// The final report arrived.
    Report { status: String, json: Value },
    /// No report within the wait.
    TimedOut { uuid: String },
}

/// Asks every worker to cancel the job `uuid` (a message on the control exchange).
pub async fn cancel(config: &Config, uuid: &str) -> anyhow::Result<()> {
    let uuid = uuid::Uuid::parse_str(uuid)
        .with_context(|| format!("{uuid:?} is not a uuid"))?
        .to_string();
    let topology = Topology::new(&config.amqp.prefix);
    let connection =
        std::sync::Arc::new(broker::connect_configured(config, "image-worker cancel").await?);
    let publisher = Publisher::open(&connection).await?;
    topology.declare(&publisher.channel(), &[]).await?;
    let body = serde_json::to_vec(&serde_json::json!({"action": "cancel", "uuid": uuid}))?;
    publisher
        .publish(
            &topology.control_exchange(),
            "",
            &body,
            BasicProperties::default(),
            false,
        )
        .await?;
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(())
}

/// Publishes `job` (a JSON object with `uuid` and `type`) to `<cap>.<pool>`; with `wait`, waits
/// for the report on a private reply queue, printing `running` events to stderr meanwhile.
pub async fn submit(
    config: &Config,
    job: Map<String, Value>,
    pool: &str,
    wait: Option<Duration>,
) -> anyhow::Result<Submitted> {
    let uuid = job
        .get("uuid")
        .and_then(Value::as_str)
        .context("the job has no uuid")?
        .to_string();
    let job_type = job
        .get("type")
        .and_then(Value::as_str)
        .and_then(JobType::parse)
        .context("the job has no valid type")?;
    let topology = Topology::new(&config.amqp.prefix);
    let connection =
        std::sync::Arc::new(broker::connect_configured(config, "image-worker submit").await?);
    let publisher = Publisher::open(&connection).await?;
    let cap = job_type.cap().to_string();
    // Declaring the job queue means a job sent before any worker of the pool started waits for one.
    topology
        .declare(&publisher.channel(), &[(cap.clone(), pool.to_string())])
        .await?;

    let mut replies = None;
    let mut props = BasicProperties::default().with_correlation_id(ShortString::from(uuid.clone()));
    if wait.is_some() {
        let channel = connection.create_channel().await?;
        // One private queue: the running events (bound here) and the reply (sent to it by name).
        let (queue, consumer) = broker::private_consumer(
            &channel,
            &topology.events_exchange(),
            &format!("job.{}.running", job_type.as_str()),
        )
        .await?;
        props = props.with_reply_to(queue);
        replies = Some((channel, consumer));
    }
    let body = serde_json::to_vec(&Value::Object(job))?;
    publisher
        .publish(
            &topology.jobs_exchange(),
            &Topology::routing_key(&cap, pool),
            &body,
            props,
            true,
        )
        .await
        .context("the broker did not take the job")?;
    eprintln!("submitted {} job {uuid} to {cap}.{pool}", job_type.as_str());

    let (Some(limit), Some((_channel, mut consumer))) = (wait, replies) else {
        return Ok(Submitted::Queued { uuid });
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let delivery = match next {
            Err(_) => return Ok(Submitted::TimedOut { uuid }),
            Ok(None) => anyhow::bail!("the broker closed the reply queue"),
            Ok(Some(d)) => d?,
        };
        let value: Value = match serde_json::from_slice(&delivery.data) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if value.get("uuid").and_then(Value::as_str) != Some(uuid.as_str()) {
            continue;
        }
        let status = value
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if status == "running" {
            let phase = value
                .get("phase")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let current = value
                .pointer("/progress/current")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let total = value.pointer("/progress/total").and_then(Value::as_u64);
            match total {
                Some(t) => eprintln!("  {phase}: {current}/{t} bytes"),
                None if current > 0 => eprintln!("  {phase}: {current} bytes"),
                None => eprintln!("  {phase}"),
            }
            continue;
        }
        let _ = connection.close(200, ShortString::from("done")).await;
        return Ok(Submitted::Report {
            status,
            json: value,
        });
    }
}
