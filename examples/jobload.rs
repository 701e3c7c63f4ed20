//! Load generator of the benchmarks (`bench/`): publishes `--count` jobs made from a JSON
//! template (each with a fresh uuid) to `<prefix>.jobs`, collects their final reports from a
//! private reply queue and prints one JSON line of figures:
//! `{"count", "reports", "unique", "duplicates", "lost", "seconds", "per_s", "statuses",
//! "last_report_unix"}`.
//!
//! `seconds` runs from the first publish (or, with `--collect-only`, from the start) to the last
//! report; `last_report_unix` is when that report came, for callers that time from elsewhere. With `--queue-only` it publishes,
//! waits for the broker's confirms and exits (the reports then go to the queue named by
//! `--reply-queue`, which `--collect-only` drains later): that is how the scale-out benchmark
//! queues a backlog before any worker starts.
//!
//! cargo run --release --example jobload -- --prefix P --count N --job '{"type":"pull",...}'

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;

use image_worker::broker::Topology;

struct Args {
    url: String,
    prefix: String,
    count: usize,
    job: Value,
    routing_key: String,
    reply_queue: Option<String>,
    queue_only: bool,
    collect_only: bool,
    timeout: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        prefix: "bench".into(),
        count: 1,
        job: Value::Null,
        routing_key: "image.general".into(),
        reply_queue: None,
        queue_only: false,
        collect_only: false,
        timeout: Duration::from_secs(600),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--prefix" => args.prefix = value()?,
            "--count" => args.count = value()?.parse()?,
            "--job" => args.job = serde_json::from_str(&value()?).context("--job is not JSON")?,
            "--routing-key" => args.routing_key = value()?,
            "--reply-queue" => args.reply_queue = Some(value()?),
            "--timeout-s" => args.timeout = Duration::from_secs(value()?.parse()?),
            "--queue-only" => args.queue_only = true,
            "--collect-only" => args.collect_only = true,
            other => bail!("unknown argument {other}"),
        }
    }
    if !args.collect_only && !args.job.is_object() {
        bail!("--job must be a JSON object");
    }
    if (args.queue_only || args.collect_only) && args.reply_queue.is_none() {
        bail!("--queue-only and --collect-only need --reply-queue");
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let topology = Topology::new(&args.prefix);
    let connection = Connection::connect(&args.url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let (cap, pool) = args
        .routing_key
        .split_once('.')
        .context("--routing-key is <cap>.<pool>")?;
    topology
        .declare(&channel, &[(cap.to_string(), pool.to_string())])
        .await?;

    // A named reply queue outlives this process (queue-only, then collect-only); an unnamed one
    // is private to it.
    let reply_queue = match &args.reply_queue {
        Some(name) => {
            channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            ShortString::from(name.clone())
        }
        None => image_worker::broker::private_queue(&channel).await?,
    };

    let mut expected = HashSet::new();
    let started = Instant::now();
    if args.collect_only {
        expected.extend((0..args.count).map(|i| i.to_string()));
    } else {
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut confirms = Vec::with_capacity(args.count);
        for _ in 0..args.count {
            let uuid = uuid::Uuid::new_v4().to_string();
            let mut job = args.job.clone();
            job["uuid"] = Value::String(uuid.clone());
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_correlation_id(uuid.clone().into())
                .with_reply_to(reply_queue.clone());
            confirms.push(
                publisher
                    .basic_publish(
                        topology.jobs_exchange().as_str().into(),
                        args.routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &serde_json::to_vec(&job)?,
                        props,
                    )
                    .await?,
            );
            expected.insert(uuid);
        }
        for confirm in confirms {
            confirm.await?;
        }
        if args.queue_only {
            println!(
                "{}",
                serde_json::json!({"queued": args.count, "seconds": started.elapsed().as_secs_f64()})
            );
            return Ok(());
        }
    }

    let mut consumer = channel
        .basic_consume(
            reply_queue.clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut seen = HashSet::new();
    let mut reports = 0usize;
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut last = started.elapsed();
    let mut last_report_unix = 0.0;
    while reports < args.count {
        let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) => bail!("the broker closed the reply queue"),
            Err(_) => break,
        };
        let report: Value = serde_json::from_slice(&delivery.data)?;
        reports += 1;
        last = started.elapsed();
        last_report_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let status = report["status"].as_str().unwrap_or("?").to_string();
        *statuses.entry(status).or_default() += 1;
        if let Some(uuid) = report["uuid"].as_str() {
            seen.insert(uuid.to_string());
        }
    }
    // A short grace period catches duplicates that arrive after the last expected report.
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(300), consumer.next()).await
    {
        reports += 1;
        if let Ok(report) = serde_json::from_slice::<Value>(&delivery.data)
            && let Some(uuid) = report["uuid"].as_str()
        {
            seen.insert(uuid.to_string());
        }
    }
    let unique = seen.len();
    let lost = if args.collect_only {
        args.count.saturating_sub(unique)
    } else {
        expected.difference(&seen).count()
    };
    if args.reply_queue.is_some() {
        let _ = channel
            .queue_delete(reply_queue.clone(), Default::default())
            .await;
    }
    let seconds = last.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "count": args.count,
            "reports": reports,
            "unique": unique,
            "duplicates": reports - unique,
            "lost": lost,
            "seconds": seconds,
            "per_s": unique as f64 / seconds.max(1e-9),
            "last_report_unix": last_report_unix,
            "statuses": statuses,
        })
    );
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
