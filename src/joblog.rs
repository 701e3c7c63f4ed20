//! One job's log: every line goes to `<logs_dir>/job.log` (whole), to the worker's own log (with
//! the job's uuid), and to an in-memory tail that becomes the report's `logs`. Every line is
//! masked first, so no secret reaches any of the three.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Datelike, Utc};

use crate::secrets::SecretMask;

/// `<root>/<YYYY>/<MM>/images/<uuid>`.
pub fn logs_dir_for(root: &Path, uuid: &str, at: DateTime<Utc>) -> PathBuf {
    root.join(format!("{:04}", at.year()))
        .join(format!("{:02}", at.month()))
        .join("images")
        .join(uuid)
}

/// Appends one line to a job's `job.log` from outside its run (the run was interrupted, so its
/// log could not say so itself). Best effort.
pub fn append_line(root: &Path, uuid: &str, text: &str) {
    let path = logs_dir_for(root, uuid, Utc::now()).join("job.log");
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = writeln!(f, "{} {text}", Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

pub struct JobLog {
    uuid: String,
    dir: PathBuf,
    file: Mutex<Option<LineWriter<File>>>,
    tail: Mutex<VecDeque<String>>,
    tail_lines: usize,
    mask: SecretMask,
}

impl JobLog {
    /// Creates the job's log directory and opens `job.log` for appending (a redelivered job
    /// keeps the earlier attempt's lines).
    pub fn create(
        root: &Path,
        uuid: &str,
        at: DateTime<Utc>,
        mask: SecretMask,
        tail_lines: usize,
    ) -> std::io::Result<Self> {
        let dir = logs_dir_for(root, uuid, at);
        std::fs::create_dir_all(&dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("job.log"))?;
        Ok(Self {
            uuid: uuid.to_string(),
            dir,
            file: Mutex::new(Some(LineWriter::new(file))),
            tail: Mutex::new(VecDeque::with_capacity(tail_lines)),
            tail_lines: tail_lines.max(1),
            mask,
        })
    }

    /// A log that could not open its file: lines still reach the worker's log and the tail.
    pub fn without_file(
        root: &Path,
        uuid: &str,
        at: DateTime<Utc>,
        mask: SecretMask,
        tail_lines: usize,
    ) -> Self {
        Self {
            uuid: uuid.to_string(),
            dir: logs_dir_for(root, uuid, at),
            file: Mutex::new(None),
            tail: Mutex::new(VecDeque::with_capacity(tail_lines)),
            tail_lines: tail_lines.max(1),
            mask,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn mask(&self) -> &SecretMask {
        &self.mask
    }

    pub fn info(&self, message: impl AsRef<str>) {
        self.line(Level::Info, message.as_ref());
    }

    pub fn warn(&self, message: impl AsRef<str>) {
        self.line(Level::Warn, message.as_ref());
    }

    pub fn error(&self, message: impl AsRef<str>) {
        self.line(Level::Error, message.as_ref());
    }

    /// Logs one line (several if `message` holds newlines).
    pub fn line(&self, level: Level, message: &str) {
        let masked = self.mask.mask(message);
        let now = Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
        let tag = match level {
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        };
        for text in masked.lines() {
            match level {
                Level::Info => tracing::info!(job = %self.uuid, "{text}"),
                Level::Warn => tracing::warn!(job = %self.uuid, "{text}"),
                Level::Error => tracing::error!(job = %self.uuid, "{text}"),
            }
            let line = format!("{now} {tag} {text}");
            if let Some(file) = self.file.lock().unwrap().as_mut()
                && let Err(e) = writeln!(file, "{line}")
            {
                tracing::warn!(job = %self.uuid, error = %e, "cannot write the job log");
            }
            let mut tail = self.tail.lock().unwrap();
            if tail.len() == self.tail_lines {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }

    /// The last lines, newest last, as the report's `logs`.
    pub fn tail(&self) -> String {
        let tail = self.tail.lock().unwrap();
        let mut out = String::new();
        for line in tail.iter() {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// Writes `report.json` beside `job.log`; the caller passes the already masked report.
    pub fn write_report(&self, report_json: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join("report.json.tmp");
        std::fs::write(&tmp, report_json)?;
        std::fs::rename(tmp, self.dir.join("report.json"))
    }

    /// Flushes and closes `job.log`.
    pub fn close(&self) {
        if let Some(mut file) = self.file.lock().unwrap().take() {
            let _ = file.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn writes_masked_lines_and_keeps_a_tail() {
        let root = std::env::temp_dir().join(format!("iw-joblog-{}", uuid::Uuid::new_v4()));
        let at = Utc.with_ymd_and_hms(2026, 3, 9, 1, 2, 3).unwrap();
        let mut mask = SecretMask::default();
        mask.add("pa55word");
        let log = JobLog::create(&root, "u-1", at, mask, 2).unwrap();
        assert_eq!(log.dir(), root.join("2026/03/images/u-1"));
        log.info("one");
        log.warn("two with pa55word");
        log.error("three\nfour");
        let tail = log.tail();
        assert_eq!(tail.lines().count(), 2);
        assert!(tail.lines().next().unwrap().ends_with("ERROR three"));
        assert!(tail.ends_with("ERROR four\n"));
        log.write_report(br#"{"x":"y"}"#).unwrap();
        log.close();
        let whole = std::fs::read_to_string(log.dir().join("job.log")).unwrap();
        assert_eq!(whole.lines().count(), 4);
        assert!(whole.contains("WARN two with ********"));
        assert!(!whole.contains("pa55word"));
        let report = std::fs::read_to_string(log.dir().join("report.json")).unwrap();
        assert_eq!(report, r#"{"x":"y"}"#);
        std::fs::remove_dir_all(root).unwrap();
    }
}
