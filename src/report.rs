//! The image record a job reports: every field of the seed API's image records, same names, same
//! types, plus `digest`, `error`, `started_at`, `finished_at` and what discovery found.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::discovery::{Discovery, Manifest};

/// Who ran the job: the record's `worker` and `meta.worker` blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub app_label: String,
    pub worker_id: String,
    pub site: String,
    pub bldg: String,
    pub caps: Vec<String>,
    pub service_name: String,
    pub service_url: String,
    pub interest_list: Vec<String>,
    pub group: String,
    pub insert_time: String,
}

impl WorkerInfo {
    /// This worker's identity from its configuration; `insert_time` is now.
    pub fn from_config(cfg: &crate::config::WorkerConfig) -> Self {
        Self {
            app_label: cfg.app_label.clone().unwrap_or_else(host_name),
            worker_id: cfg
                .worker_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            site: cfg.site.clone(),
            bldg: cfg.bldg.clone(),
            caps: cfg.caps.clone(),
            service_name: cfg.service_name.clone(),
            service_url: cfg.service_url.clone(),
            interest_list: cfg.interest_list.clone(),
            group: cfg.group.clone(),
            insert_time: insert_time(Utc::now()),
        }
    }
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "image-worker".into())
}

/// `YYYY-MM-DD HH:MM:SS` UTC, as the seed's `date_created`.
pub fn record_date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// RFC 3339 with microseconds and `Z`, as the seed's `insert_time`.
pub fn insert_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Final states and the running state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Successful,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Successful => "successful",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Why a job failed, in a form a program can act on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// `invalid_job`, `auth`, `not_found`, `registry_unreachable`, `registry_error`,
    /// `engine_unavailable`, `engine`, `discovery`, `timeout`, `unsupported`, `internal`.
    pub kind: String,
    pub message: String,
    /// Whether the same job could succeed if tried again later.
    pub retryable: bool,
}

/// `{"detail": {...}}` as in the seed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerDetails {
    pub detail: Map<String, Value>,
}

/// The record's `meta` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub worker: WorkerInfo,
    pub logs_dir: String,
    pub container_details: ContainerDetails,
}

/// What discovery did, beside the seed's `jobs` and `manifests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoverySummary {
    /// `layers` or `archive`: the source that ran.
    pub source: String,
    pub root: String,
    pub files_scanned: u64,
    pub duration_ms: u64,
}

/// The image record. Field order follows the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub uuid: String,
    pub name: String,
    pub tag: String,
    pub status: Status,
    #[serde(rename = "type")]
    pub record_type: String,
    pub custom: bool,
    pub yaml_content: String,
    pub container_details: ContainerDetails,
    pub size: i64,
    pub virtual_size: i64,
    pub image_id: Option<String>,
    pub push_url: String,
    pub date_created: String,
    pub date_updated: String,
    pub nfs_path: Option<String>,
    pub group: String,
    pub is_deleted: bool,
    /// The full reference of the image the record describes, once known.
    pub image: Option<String>,
    pub data: Map<String, Value>,
    pub meta: Meta,
    pub jobs: Vec<String>,
    pub manifests: Vec<Manifest>,
    pub logs_dir: String,
    pub worker: WorkerInfo,
    pub logs: String,
    pub tags: Vec<String>,
    pub deleted: bool,
    // Beyond the seed.
    /// Registry digest (`sha256:...`) of the image, once known.
    pub digest: Option<String>,
    pub error: Option<ErrorInfo>,
    /// Warnings that did not fail the job (broken manifests, unreadable files).
    pub warnings: Vec<String>,
    pub discovery: Option<DiscoverySummary>,
    /// The job type as received (`pull`, `build`, `polaris_build`).
    pub job_type: String,
    /// Whether the broker had delivered this job before (a previous worker died or left it).
    pub redelivered: bool,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Whether this job holds its image in the worker's cache (internal, not reported).
    #[serde(skip)]
    pub image_held: bool,
}

impl Report {
    /// Applies what discovery found.
    pub fn set_discovery(&mut self, found: Discovery, duration: std::time::Duration) {
        self.jobs = found.jobs;
        self.manifests = found.manifests;
        self.warnings.extend(found.warnings);
        self.discovery = Some(DiscoverySummary {
            source: found.source.to_string(),
            root: found.root,
            files_scanned: found.files_scanned,
            duration_ms: duration.as_millis() as u64,
        });
    }
}

/// A `running` event: small, sent at most about once a second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningEvent {
    pub uuid: String,
    pub status: Status,
    pub job_type: String,
    pub phase: String,
    /// Bytes done and, when known, in all.
    pub progress: Progress,
    pub worker_id: String,
    pub date_updated: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub current: u64,
    pub total: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn dates_match_the_seed_formats() {
        let t = Utc.with_ymd_and_hms(2021, 10, 20, 3, 34, 3).unwrap()
            + chrono::Duration::microseconds(267_583);
        assert_eq!(record_date(t), "2021-10-20 03:34:03");
        assert_eq!(insert_time(t), "2021-10-20T03:34:03.267583Z");
    }

    #[test]
    fn worker_info_defaults() {
        let cfg = crate::config::WorkerConfig::default();
        let w = WorkerInfo::from_config(&cfg);
        assert!(!w.app_label.is_empty());
        assert!(uuid::Uuid::parse_str(&w.worker_id).is_ok());
        assert_eq!(w.group, "general");
        assert_eq!(w.caps, vec!["image", "polaris_image", "pyats"]);
    }
}
