//! Leases: how a job outlives RabbitMQ's `consumer_timeout` without being lost or run twice.
//!
//! RabbitMQ closes a channel whose delivery stays unacknowledged longer than `consumer_timeout`
//! (30 minutes by default), which would requeue a two-hour build while it runs. So a job still
//! running after `jobs.lease_after_s` hands its message over to a lease:
//!
//! 1. a copy of the job message is published to its own durable queue `<prefix>.lease.<uuid>`,
//!    whose messages live `jobs.lease_s` (`x-message-ttl`) and then dead-letter back to the job
//!    exchange with the job's routing key (`x-dead-letter-exchange`, `-routing-key`);
//! 2. once the broker confirms the copy, the original delivery is acknowledged;
//! 3. every third of `lease_s` the worker renews: a fresh copy, then the older one is taken off;
//! 4. when the report is out, the lease queue is deleted, and the copy with it.
//!
//! If the worker dies, nobody renews: the copy expires and RabbitMQ puts it back in the job
//! queue, where another worker takes it (it arrives with an `x-death` header, and counts as
//! redelivered). No coordinator of our own: the broker's TTL and dead-lettering are the timer.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::broker::{PublishError, Publisher, Topology};

pub struct Lease {
    queue: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

impl Lease {
    /// Publishes the first copy; the caller acknowledges the original delivery afterwards.
    pub async fn take(
        publisher: &Publisher,
        topology: &Topology,
        uuid: &str,
        routing_key: &str,
        body: &[u8],
        reply_to: Option<&str>,
        lease: Duration,
    ) -> Result<Self, PublishError> {
        let queue = topology.lease_queue(uuid);
        let ms = lease.as_millis().min(i64::MAX as u128) as i64;
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms * 3));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(topology.jobs_exchange())),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(routing_key.to_string())),
        );
        publisher
            .channel()
            .queue_declare(
                queue.clone().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        let mut properties =
            BasicProperties::default().with_correlation_id(ShortString::from(uuid.to_string()));
        if let Some(r) = reply_to {
            properties = properties.with_reply_to(ShortString::from(r.to_string()));
        }
        let lease = Self {
            queue,
            body: body.to_vec(),
            properties,
        };
        lease.publish_copy(publisher).await?;
        Ok(lease)
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    async fn publish_copy(&self, publisher: &Publisher) -> Result<(), PublishError> {
        publisher
            .publish("", &self.queue, &self.body, self.properties.clone(), true)
            .await
    }

    /// A fresh copy first, then the oldest one off: a copy is always there.
    pub async fn renew(&self, publisher: &Publisher) -> Result<(), PublishError> {
        self.publish_copy(publisher).await?;
        if let Some(old) = publisher
            .channel()
            .basic_get(self.queue.clone().into(), BasicGetOptions { no_ack: false })
            .await?
        {
            old.delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    /// The job is reported: the lease and its copy go.
    pub async fn release(&self, publisher: &Publisher) -> Result<(), PublishError> {
        publisher
            .channel()
            .queue_delete(self.queue.clone().into(), QueueDeleteOptions::default())
            .await?;
        Ok(())
    }
}
