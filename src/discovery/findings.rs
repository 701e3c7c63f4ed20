//! What a discovery has found so far. Both sources hand every visible file under the root to
//! the same `Findings`, which applies the rules, so their reports can only differ in what they
//! saw, never in how they judged it.

use std::collections::BTreeSet;
use std::io::{BufRead, Read};

use super::manifest::{Manifest, parse_manifest};
use super::rules::{CompiledRules, is_job_source, jobfiles_txt};
use super::{Discovery, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interest {
    Job,
    Manifest,
    None,
}

#[derive(Debug)]
pub(crate) struct Findings {
    pub(crate) rules: CompiledRules,
    max_manifest_bytes: u64,
    jobs: BTreeSet<String>,
    manifests: Vec<Manifest>,
    warnings: BTreeSet<String>,
    listed_seen: BTreeSet<String>,
    files_scanned: u64,
}

impl Findings {
    pub(crate) fn new(rules: CompiledRules, max_manifest_bytes: u64) -> Self {
        Self {
            rules,
            max_manifest_bytes,
            jobs: BTreeSet::new(),
            manifests: Vec::new(),
            warnings: BTreeSet::new(),
            listed_seen: BTreeSet::new(),
            files_scanned: 0,
        }
    }

    pub(crate) fn max_manifest_bytes(&self) -> u64 {
        self.max_manifest_bytes
    }

    pub(crate) fn interest(path: &str) -> Interest {
        if path.ends_with(".py") {
            Interest::Job
        } else if path.ends_with(".tem") {
            Interest::Manifest
        } else {
            Interest::None
        }
    }

    /// Counts one visible non-directory entry under the root, outside skipped trees.
    pub(crate) fn count_file(&mut self, path: &str) {
        self.files_scanned += 1;
        if self.rules.is_listed(path) {
            self.listed_seen.insert(path.to_owned());
        }
    }

    pub(crate) fn warn(&mut self, path: &str, reason: impl std::fmt::Display) {
        self.warnings.insert(format!("{path}: {reason}"));
    }

    /// Reads `<root>/installation/jobfiles.txt` (at most `max_manifest_bytes` of it).
    pub(crate) fn jobfiles_txt(&mut self, reader: impl Read) {
        let file = jobfiles_txt(self.rules.root());
        let mut bytes = Vec::new();
        if let Err(e) = reader.take(self.max_manifest_bytes).read_to_end(&mut bytes) {
            return self.warn(&file, format_args!("unreadable: {e}"));
        }
        for warning in self
            .rules
            .add_jobfiles_txt(&file, &String::from_utf8_lossy(&bytes))
        {
            self.warnings.insert(warning);
        }
    }

    pub(crate) fn job_file(&mut self, path: &str, reader: &mut impl BufRead) {
        let named = self.rules.is_named_job(path);
        match is_job_source(reader, named) {
            Ok(true) => {
                self.jobs.insert(path.to_owned());
            }
            Ok(false) if self.rules.is_listed(path) => self.warn(
                path,
                "listed as a job file but has no top-level `def main(`",
            ),
            Ok(false) => {}
            Err(e) => self.warn(path, format_args!("unreadable: {e}")),
        }
    }

    /// `size` is what the source says; a larger file is refused without being read.
    pub(crate) fn manifest(&mut self, path: &str, size: u64, reader: impl Read) {
        let max = self.max_manifest_bytes;
        let too_big = |size: u64| format!("manifest is {size} bytes, over the {max}-byte limit");
        if size > max {
            return self.warn(path, too_big(size));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        match reader.take(max + 1).read_to_end(&mut bytes) {
            Err(e) => self.warn(path, format_args!("unreadable: {e}")),
            Ok(n) if n as u64 > max => self.warn(path, too_big(n as u64)),
            Ok(_) => match parse_manifest(path, &bytes) {
                Ok(manifest) => self.manifests.push(manifest),
                Err(reason) => self.warn(path, reason),
            },
        }
    }

    pub(crate) fn finish(mut self, source: Source) -> Discovery {
        let root = self.rules.root().to_owned();
        let missing: Vec<String> = self
            .rules
            .listed()
            .filter(|p| !self.listed_seen.contains(*p))
            .cloned()
            .collect();
        for path in missing {
            self.warn(
                &path,
                "listed as a job file but not found (outside skipped directories)",
            );
        }
        self.manifests.sort_by(|a, b| a.file.cmp(&b.file));
        Discovery {
            root,
            source,
            jobs: self.jobs.into_iter().collect(),
            manifests: self.manifests,
            warnings: self.warnings.into_iter().collect(),
            files_scanned: self.files_scanned,
        }
    }
}
