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

/// Longest line kept, in bytes, in `job.log`, the worker's log and the tail. A build step can
/// print megabytes on one line (a progress bar, a minified file, `cat` of a binary): past this
/// the line is cut and says how much was left out, so one line cannot bloat the report or the
/// worker's log.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

/// Most bytes of the report's `logs` (the tail). The report travels as one AMQP message and is
/// stored as an API record; `job.log` holds every line for whoever needs more.
pub const MAX_TAIL_BYTES: usize = 64 * 1024;

/// `text` cut to at most about `max` bytes (on a character boundary), with a note of how many
/// bytes were left out; unchanged when it fits.
pub fn truncate_line(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{} [line truncated: {} of {} bytes left out]",
        &text[..cut],
        text.len() - cut,
        text.len()
    ))
}

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
            let text = truncate_line(text, MAX_LINE_BYTES);
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

    /// The last lines, newest last, as the report's `logs`: at most `logs.tail_lines` lines
    /// and [`MAX_TAIL_BYTES`] bytes; when the byte cap drops lines, a first line says so.
    pub fn tail(&self) -> String {
        let tail = self.tail.lock().unwrap();
        let mut kept = 0;
        let mut bytes = 0;
        for line in tail.iter().rev() {
            if bytes + line.len() + 1 > MAX_TAIL_BYTES {
                break;
            }
            bytes += line.len() + 1;
            kept += 1;
        }
        let mut out = String::with_capacity(bytes + 128);
        let omitted = tail.len() - kept;
        if omitted > 0 {
            out.push_str(&format!(
                "[{omitted} earlier lines left out: the tail is capped at {MAX_TAIL_BYTES} bytes; job.log has them]\n"
            ));
        }
        for line in tail.iter().skip(omitted) {
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

    #[test]
    fn long_lines_are_cut_and_the_tail_is_capped_in_bytes() {
        assert_eq!(truncate_line("short", 8), "short");
        assert_eq!(
            truncate_line("abcdefghij", 4),
            "abcd [line truncated: 6 of 10 bytes left out]"
        );
        // Never inside a character: "é" is two bytes.
        assert_eq!(
            truncate_line("aéé", 2),
            "a [line truncated: 4 of 5 bytes left out]"
        );

        let root = std::env::temp_dir().join(format!("iw-joblog-{}", uuid::Uuid::new_v4()));
        let log = JobLog::create(&root, "u-2", Utc::now(), SecretMask::default(), 100).unwrap();
        // 6 MB of build output on one line, then 20 lines of 7 KiB.
        log.info("x".repeat(6_000_000));
        for i in 0..20 {
            log.info(format!("{i:02} {}", "y".repeat(7 * 1024)));
        }
        log.close();
        let whole = std::fs::read_to_string(log.dir().join("job.log")).unwrap();
        let first = whole.lines().next().unwrap();
        assert!(
            first.ends_with("x [line truncated: 5991808 of 6000000 bytes left out]"),
            "{}",
            &first[first.len() - 80..]
        );
        assert!(whole.len() < 21 * MAX_LINE_BYTES + 4096, "{}", whole.len());
        let tail = log.tail();
        assert!(tail.len() <= MAX_TAIL_BYTES + 200, "{}", tail.len());
        let lines: Vec<&str> = tail.lines().collect();
        // 64 KiB hold the newest 9 of the 7 KiB lines; the first line says what is missing.
        assert_eq!(
            lines[0],
            "[12 earlier lines left out: the tail is capped at 65536 bytes; job.log has them]"
        );
        assert_eq!(lines.len(), 10);
        assert!(lines[9].contains(" INFO 19 "), "{}", &lines[9][..60]);
        assert!(lines[1].contains(" INFO 11 "), "{}", &lines[1][..60]);
        std::fs::remove_dir_all(root).unwrap();
    }
}
