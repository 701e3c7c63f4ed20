//! The jobs this worker is running, by uuid.
//!
//! A job's message can arrive twice while it runs: the broker redelivers it after a reconnect
//! (the old channel's delivery tag died with the channel). The second delivery is attached to the
//! running job instead of starting it again, and acknowledged with it when its report is out.
//! Cancel requests land here too: a running job's token is cancelled; a uuid not running yet is
//! remembered, so its message is answered `cancelled` when it arrives.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;

/// How long a cancel request for a job not seen yet is remembered.
const CANCEL_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// How many such requests are remembered at most.
const CANCEL_MEMORY_LEN: usize = 10_000;

/// What to do with a delivery.
pub enum Admission {
    /// Run the job; the token is cancelled by a cancel request.
    Run(CancellationToken),
    /// The job is running here already; the delivery waits for its report.
    Attached,
    /// A cancel request came first: answer `cancelled` without running it.
    Cancelled(Box<Delivery>),
}

struct Slot {
    cancel: CancellationToken,
    deliveries: Vec<Delivery>,
    reply_to: Vec<String>,
}

#[derive(Default)]
pub struct InFlight {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: HashMap<String, Slot>,
    cancelled: HashMap<String, Instant>,
}

impl InFlight {
    pub fn admit(&self, uuid: &str, delivery: Delivery) -> Admission {
        let mut inner = self.inner.lock().unwrap();
        if let Some(at) = inner.cancelled.remove(uuid)
            && at.elapsed() < CANCEL_MEMORY
        {
            return Admission::Cancelled(Box::new(delivery));
        }
        let reply_to = delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|r| r.as_str().to_string());
        if let Some(slot) = inner.running.get_mut(uuid) {
            slot.reply_to
                .extend(reply_to.filter(|r| !slot.reply_to.contains(r)));
            slot.deliveries.push(delivery);
            return Admission::Attached;
        }
        let cancel = CancellationToken::new();
        inner.running.insert(
            uuid.to_string(),
            Slot {
                cancel: cancel.clone(),
                deliveries: vec![delivery],
                reply_to: reply_to.into_iter().collect(),
            },
        );
        Admission::Run(cancel)
    }

    /// Cancels a running job, or remembers the uuid for when its message comes. Returns whether
    /// the job was running here.
    pub fn cancel(&self, uuid: &str) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if let Some(slot) = inner.running.get(uuid) {
            slot.cancel.cancel();
            return true;
        }
        if inner.cancelled.len() >= CANCEL_MEMORY_LEN {
            inner.cancelled.retain(|_, at| at.elapsed() < CANCEL_MEMORY);
            if inner.cancelled.len() >= CANCEL_MEMORY_LEN
                && let Some(oldest) = inner
                    .cancelled
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| k.clone())
            {
                inner.cancelled.remove(&oldest);
            }
        }
        inner.cancelled.insert(uuid.to_string(), Instant::now());
        false
    }

    /// The deliveries held for a running job, taken out (the job stays running): a lease took
    /// them over.
    pub fn take_deliveries(&self, uuid: &str) -> Vec<Delivery> {
        let mut inner = self.inner.lock().unwrap();
        inner
            .running
            .get_mut(uuid)
            .map(|slot| std::mem::take(&mut slot.deliveries))
            .unwrap_or_default()
    }

    /// Where the job's report is to be sent, beside the events exchange.
    pub fn reply_to(&self, uuid: &str) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        inner
            .running
            .get(uuid)
            .map(|slot| slot.reply_to.clone())
            .unwrap_or_default()
    }

    /// The job is over: its deliveries, to settle.
    pub fn finish(&self, uuid: &str) -> Vec<Delivery> {
        let mut inner = self.inner.lock().unwrap();
        inner
            .running
            .remove(uuid)
            .map(|slot| slot.deliveries)
            .unwrap_or_default()
    }

    pub fn running(&self) -> usize {
        self.inner.lock().unwrap().running.len()
    }
}
