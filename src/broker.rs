//! RabbitMQ: the topology of DESIGN.md, declared idempotently, and publishing with confirms.
//!
//! - `<prefix>.jobs` (direct): jobs, routing key `<cap>.<pool>`, one durable queue per key,
//!   `<prefix>.jobs.<cap>.<pool>`; workers of a pool compete for its queue.
//! - `<prefix>.events` (topic): `job.<type>.<status>` and `worker.online|heartbeat|offline`.
//! - `<prefix>.dead` (queue): messages that cannot be jobs, with the reason in `x-error`.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

/// Names of the exchanges and queues, under one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
}

impl Topology {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Fanout exchange every worker hears: cancel requests.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// The queue holding a long job's message while it runs (see `lease`).
    pub fn lease_queue(&self, uuid: &str) -> String {
        format!("{}.lease.{uuid}", self.prefix)
    }

    pub fn job_queue(&self, cap: &str, pool: &str) -> String {
        format!("{}.jobs.{cap}.{pool}", self.prefix)
    }

    pub fn routing_key(cap: &str, pool: &str) -> String {
        format!("{cap}.{pool}")
    }

    /// Declares the exchanges, the dead-letter queue and the job queues of `(cap, pool)` pairs.
    pub async fn declare(
        &self,
        channel: &Channel,
        queues: &[(String, String)],
    ) -> lapin::Result<()> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.jobs_exchange().into(),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.control_exchange().into(),
                ExchangeKind::Fanout,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(
                self.dead_queue().into(),
                durable_queue,
                FieldTable::default(),
            )
            .await?;
        for (cap, pool) in queues {
            let queue = self.job_queue(cap, pool);
            channel
                .queue_declare(queue.clone().into(), durable_queue, FieldTable::default())
                .await?;
            channel
                .queue_bind(
                    queue.into(),
                    self.jobs_exchange().into(),
                    Self::routing_key(cap, pool).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// The broker closed the channel over this message (406 PRECONDITION_FAILED: larger than
    /// its `max_message_size`, a `user_id` that is not the connection's...): sending the same
    /// bytes again can only fail again.
    #[error("the broker refused the message: {0}")]
    Refused(String),
    #[error("the broker returned the message: no queue for {0}")]
    Unroutable(String),
    #[error("stopped before the broker confirmed")]
    Stopped,
}

/// The frame size the worker asks for when the URL names none (`?frame_max=`). lapin keeps 32
/// frames of buffer in each direction: RabbitMQ's 128 KiB default costs 8 MiB per connection,
/// most of an idle worker's memory, while job messages and reports travel as well in 32 KiB
/// frames.
pub const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

impl PublishError {
    /// Whether the broker refused this very message, as opposed to being away: trying the same
    /// message again cannot help, so the caller must send something else or give up on it.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Nacked | Self::Refused(_))
    }
}

/// A broker error on publish: a refusal of the message, or the broker being unavailable.
fn publish_error(e: lapin::Error) -> PublishError {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) =>
        {
            PublishError::Refused(e.to_string())
        }
        _ => PublishError::Broker(e),
    }
}

/// Opens a connection; the URL's password never reaches a log.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    Connection::connect(&with_frame_max(url), properties).await
}

/// `url` with `frame_max=DEFAULT_FRAME_MAX` added unless it sets one.
fn with_frame_max(url: &str) -> String {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    if query.split('&').any(|kv| kv.starts_with("frame_max=")) {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}frame_max={DEFAULT_FRAME_MAX}")
}

/// Opens a connection to the configured broker; an error names the URL with its password hidden.
pub async fn connect_configured(
    config: &crate::config::Config,
    name: &str,
) -> anyhow::Result<Connection> {
    use anyhow::Context;
    let url = config.amqp_url()?;
    connect(&url, name).await.with_context(|| {
        format!(
            "cannot connect to {}",
            crate::secrets::mask_url_credentials(&url)
        )
    })
}

/// A server-named queue that lives as long as this connection; returns its name.
pub async fn private_queue(channel: &Channel) -> lapin::Result<ShortString> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(queue.name().clone())
}

/// A private queue bound to `exchange` with `routing_key`, consumed without acks: how a worker
/// hears control messages and a submitter hears its job's events.
pub async fn private_consumer(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
) -> lapin::Result<(ShortString, lapin::Consumer)> {
    use lapin::options::BasicConsumeOptions;
    let queue = private_queue(channel).await?;
    channel
        .queue_bind(
            queue.clone(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((queue.clone(), consumer))
}

/// A channel in confirm mode: every publish waits for the broker's ack.
///
/// A message the broker refuses (406) closes the channel it came on, not the connection: the
/// publisher then opens a new channel on the same connection, so a refused report does not cut
/// every later publish off until a reconnect (which would requeue the job it failed for and
/// start over). It holds the connection weakly: the session's drop still closes it.
#[derive(Clone)]
pub struct Publisher {
    connection: std::sync::Weak<Connection>,
    channel: std::sync::Arc<std::sync::Mutex<Channel>>,
}

impl Publisher {
    pub async fn open(connection: &std::sync::Arc<Connection>) -> lapin::Result<Self> {
        Ok(Self {
            connection: std::sync::Arc::downgrade(connection),
            channel: std::sync::Arc::new(std::sync::Mutex::new(confirm_channel(connection).await?)),
        })
    }

    /// The current channel (a new one after a refusal).
    pub fn channel(&self) -> Channel {
        self.channel.lock().unwrap().clone()
    }

    /// Replaces `failed` with a new confirm channel, unless another publish already did.
    async fn reopen(&self, failed: &Channel) {
        let Some(connection) = self.connection.upgrade() else {
            return;
        };
        if self.channel().id() != failed.id() {
            return;
        }
        match confirm_channel(&connection).await {
            Ok(fresh) => {
                let mut current = self.channel.lock().unwrap();
                if current.id() == failed.id() {
                    *current = fresh;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reopen the publishing channel"),
        }
    }

    /// Publishes a persistent JSON message and waits for the broker to confirm it. With
    /// `mandatory`, a message no queue takes is an error rather than silently dropped.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let channel = self.channel();
        let result = self
            .publish_on(&channel, exchange, routing_key, body, properties, mandatory)
            .await;
        if let Err(PublishError::Refused(_)) = &result {
            self.reopen(&channel).await;
        }
        result
    }

    async fn publish_on(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let properties = properties
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .map_err(publish_error)?
            .await
            .map_err(publish_error)?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(format!(
                "{exchange}/{routing_key}"
            ))),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}

async fn confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The properties of a dead-lettered copy: the original's (message id, reply_to,
/// correlation_id, headers...) plus `x-error` and `x-original-routing-key`.
pub fn dead_letter_properties(
    original: &BasicProperties,
    reason: &str,
    routing_key: &str,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    for (k, v) in error_headers(reason, routing_key).inner() {
        headers.insert(k.clone(), v.clone());
    }
    original.clone().with_headers(headers)
}

/// `x-error` header with the reason a message was dead-lettered.
pub fn error_headers(reason: &str, source_queue: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-error".into(),
        AMQPValue::LongString(LongString::from(reason.to_string())),
    );
    headers.insert(
        "x-original-routing-key".into(),
        AMQPValue::LongString(LongString::from(source_queue.to_string())),
    );
    headers
}

/// Whether the broker dead-lettered this message before (an expired lease comes back so).
pub fn was_dead_lettered(properties: &BasicProperties) -> bool {
    properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key("x-death"))
}

/// The string value of a header, if present.
pub fn header_string(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let t = Topology::new("xpresso");
        assert_eq!(t.jobs_exchange(), "xpresso.jobs");
        assert_eq!(t.events_exchange(), "xpresso.events");
        assert_eq!(t.dead_queue(), "xpresso.dead");
        assert_eq!(
            t.job_queue("image", "general"),
            "xpresso.jobs.image.general"
        );
        assert_eq!(Topology::routing_key("image", "general"), "image.general");
    }

    #[test]
    fn error_header_round_trips() {
        let props =
            BasicProperties::default().with_headers(error_headers("not JSON", "image.general"));
        assert_eq!(
            header_string(&props, "x-error").as_deref(),
            Some("not JSON")
        );
        assert_eq!(header_string(&props, "nope"), None);
    }

    #[test]
    fn frame_max_is_added_unless_the_url_sets_it() {
        assert_eq!(
            with_frame_max("amqp://u:p@h:5672/%2f"),
            "amqp://u:p@h:5672/%2f?frame_max=32768"
        );
        assert_eq!(
            with_frame_max("amqp://h/%2f?heartbeat=10"),
            "amqp://h/%2f?heartbeat=10&frame_max=32768"
        );
        assert_eq!(
            with_frame_max("amqp://h/%2f?heartbeat=10&frame_max=131072"),
            "amqp://h/%2f?heartbeat=10&frame_max=131072"
        );
    }
}
