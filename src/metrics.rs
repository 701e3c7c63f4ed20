//! The worker's counters, and their Prometheus text rendering for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the job duration histogram.
const BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    jobs: Mutex<BTreeMap<(String, String), u64>>,
    durations: Mutex<BTreeMap<String, Histogram>>,
    in_flight: AtomicI64,
    bytes_pulled: AtomicU64,
    bytes_pushed: AtomicU64,
    dead_lettered: AtomicU64,
    retries: AtomicU64,
    broker_up: AtomicBool,
    engine_up: AtomicBool,
    /// A graceful shutdown started: no new jobs are taken, so the worker is not ready.
    draining: AtomicBool,
}

impl Metrics {
    pub fn job_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A job ended with `status` after `duration`.
    pub fn job_finished(&self, job_type: &str, status: &str, duration: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        *self
            .jobs
            .lock()
            .unwrap()
            .entry((job_type.to_string(), status.to_string()))
            .or_default() += 1;
        let mut durations = self.durations.lock().unwrap();
        let h = durations.entry(job_type.to_string()).or_default();
        if h.counts.is_empty() {
            h.counts = vec![0; BUCKETS.len()];
        }
        let secs = duration.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn add_bytes_pulled(&self, n: u64) {
        self.bytes_pulled.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_bytes_pushed(&self, n: u64) {
        self.bytes_pushed.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::Relaxed);
    }

    pub fn set_engine_up(&self, up: bool) {
        self.engine_up.store(up, Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn broker_up(&self) -> bool {
        self.broker_up.load(Ordering::Relaxed)
    }

    pub fn engine_up(&self) -> bool {
        self.engine_up.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP image_worker_build_info Version of this worker.\n# TYPE image_worker_build_info gauge\nimage_worker_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# HELP image_worker_jobs_total Jobs finished, by type and final status.\n# TYPE image_worker_jobs_total counter"
        );
        for ((job_type, status), n) in self.jobs.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "image_worker_jobs_total{{type=\"{job_type}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP image_worker_job_duration_seconds Time from start to report, by type.\n# TYPE image_worker_job_duration_seconds histogram"
        );
        for (job_type, h) in self.durations.lock().unwrap().iter() {
            for (bound, n) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    out,
                    "image_worker_job_duration_seconds_bucket{{type=\"{job_type}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "image_worker_job_duration_seconds_bucket{{type=\"{job_type}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "image_worker_job_duration_seconds_sum{{type=\"{job_type}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "image_worker_job_duration_seconds_count{{type=\"{job_type}\"}} {}",
                h.count
            );
        }
        gauge(
            &mut out,
            "image_worker_jobs_in_flight",
            "Jobs running now.",
            "gauge",
            self.in_flight().to_string(),
        );
        gauge(
            &mut out,
            "image_worker_pulled_bytes_total",
            "Bytes downloaded by pulls.",
            "counter",
            self.bytes_pulled.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "image_worker_pushed_bytes_total",
            "Bytes uploaded by pushes.",
            "counter",
            self.bytes_pushed.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "image_worker_dead_lettered_total",
            "Messages that were not jobs, sent to the dead-letter queue.",
            "counter",
            self.dead_lettered.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "image_worker_registry_retries_total",
            "Registry operations tried again after a transient error.",
            "counter",
            self.retries.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "image_worker_broker_up",
            "1 when connected to RabbitMQ.",
            "gauge",
            u8::from(self.broker_up()).to_string(),
        );
        gauge(
            &mut out,
            "image_worker_engine_up",
            "1 when the Docker engine answers.",
            "gauge",
            u8::from(self.engine_up()).to_string(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.job_started();
        m.job_started();
        m.job_finished("pull", "successful", Duration::from_secs(3));
        m.add_bytes_pulled(1234);
        m.set_broker_up(true);
        let text = m.render();
        assert!(
            text.contains("image_worker_jobs_total{type=\"pull\",status=\"successful\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("image_worker_job_duration_seconds_bucket{type=\"pull\",le=\"1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("image_worker_job_duration_seconds_bucket{type=\"pull\",le=\"5\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("image_worker_job_duration_seconds_count{type=\"pull\"} 1\n"));
        assert!(text.contains("image_worker_jobs_in_flight 1\n"));
        assert!(text.contains("image_worker_pulled_bytes_total 1234\n"));
        assert!(text.contains("image_worker_broker_up 1\n"));
        assert!(text.contains("image_worker_engine_up 0\n"));
    }
}
