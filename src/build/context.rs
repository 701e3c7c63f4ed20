//! A build context in memory: a tar in a `Vec`, never a directory tree on the worker. Entries
//! get fixed owners and times, so the same inputs give the same context and the engine's layer
//! cache holds across jobs.

use std::collections::BTreeSet;
use std::path::Path;

use crate::pipeline::JobError;

/// Modification time of every entry (2000-01-01): the context depends only on its content.
const MTIME: u64 = 946_684_800;

/// A tar being built in memory, with a size limit.
pub struct ContextTar {
    tar: tar::Builder<Vec<u8>>,
    bytes: u64,
    limit: u64,
    dirs: BTreeSet<String>,
    entries: BTreeSet<String>,
}

impl ContextTar {
    pub fn new(limit: u64) -> Self {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        Self {
            tar,
            bytes: 0,
            limit,
            dirs: BTreeSet::new(),
            entries: BTreeSet::new(),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn charge(&mut self, size: u64) -> Result<(), JobError> {
        self.bytes += size + 512;
        if self.bytes > self.limit {
            return Err(JobError::new(
                "invalid_job",
                format!(
                    "the build context is larger than the limit of {} bytes (build.max_context_bytes)",
                    self.limit
                ),
                false,
            ));
        }
        Ok(())
    }

    /// Adds the parent directories of `path` that are not there yet.
    fn parents(&mut self, path: &str) -> Result<(), JobError> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !self.dirs.contains(&prefix) {
                self.dir(&prefix.clone())?;
            }
        }
        Ok(())
    }

    fn claim(&mut self, path: &str) -> Result<(), JobError> {
        if !self.entries.insert(path.to_string()) {
            return Err(JobError::new(
                "invalid_job",
                format!("{path} is written twice in the build context"),
                false,
            ));
        }
        Ok(())
    }

    pub fn dir(&mut self, path: &str) -> Result<(), JobError> {
        if self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.charge(0)?;
        self.dirs.insert(path.to_string());
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.tar
            .append_data(&mut h, format!("{path}/"), std::io::empty())
            .map_err(internal)
    }

    pub fn file(&mut self, path: &str, data: &[u8], executable: bool) -> Result<(), JobError> {
        self.parents(path)?;
        self.claim(path)?;
        self.charge(data.len() as u64)?;
        let mode = if executable { 0o755 } else { 0o644 };
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar.append_data(&mut h, path, data).map_err(internal)
    }

    /// A symlink is stored as a symlink: inside the image it points into the image, and the
    /// worker never follows it on the host.
    pub fn symlink(&mut self, path: &str, target: &Path) -> Result<(), JobError> {
        self.parents(path)?;
        self.claim(path)?;
        self.charge(0)?;
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target).map_err(internal)
    }

    /// Adds the tree at `dir` under `prefix`, without following symlinks; `.git` is left out
    /// when `skip_git` (a clone's metadata: its remote, its config).
    /// An empty `prefix` puts the tree at the context's root.
    pub fn tree(&mut self, prefix: &str, dir: &Path, skip_git: bool) -> Result<u64, JobError> {
        if !prefix.is_empty() {
            self.dir(prefix)?;
        }
        let mut files = 0;
        let walker = walkdir::WalkDir::new(dir)
            .follow_links(false)
            .sort_by_file_name()
            .min_depth(1)
            .into_iter()
            .filter_entry(|e| !(skip_git && e.depth() == 1 && e.file_name() == ".git"));
        for entry in walker {
            let entry = entry.map_err(|e| {
                JobError::new("internal", format!("reading {}: {e}", dir.display()), false)
            })?;
            let rel = entry
                .path()
                .strip_prefix(dir)
                .expect("walkdir stays under its root")
                .to_string_lossy()
                .replace('\\', "/");
            let path = if prefix.is_empty() {
                rel
            } else {
                format!("{prefix}/{rel}")
            };
            let kind = entry.file_type();
            if kind.is_dir() {
                self.dir(&path)?;
            } else if kind.is_symlink() {
                let target = std::fs::read_link(entry.path()).map_err(internal)?;
                self.symlink(&path, &target)?;
            } else if kind.is_file() {
                let meta = entry.metadata().map_err(|e| internal(e.into()))?;
                self.charge(0)?;
                let data = std::fs::read(entry.path()).map_err(internal)?;
                use std::os::unix::fs::PermissionsExt;
                self.file(&path, &data, meta.permissions().mode() & 0o111 != 0)?;
                files += 1;
            }
            // Sockets, fifos and devices have no place in an image's workspace.
        }
        Ok(files)
    }

    pub fn finish(self) -> Result<Vec<u8>, JobError> {
        self.tar.into_inner().map_err(internal)
    }
}

fn internal(e: std::io::Error) -> JobError {
    JobError::new("internal", format!("building the context: {e}"), false)
}

/// A Dockerfile string literal: JSON quoting is valid in exec-form instructions, and with no
/// line break possible in a value, no value can end an instruction or start another.
pub fn json(value: &str) -> String {
    serde_json::to_string(value).expect("a string serializes")
}

/// `KEY="value"` for an `ENV` instruction, so that the image gets the value byte for byte:
/// inside double quotes the Dockerfile parser treats `\\`, `\"` and `\$` as escapes and expands
/// `$NAME` / `${NAME}` / `$(...)`-looking text, so all three are escaped. The one exception is the
/// build-file format's own reference to the workspace, `$WORKSPACE` / `${WORKSPACE}`, which
/// pyats-image-builder build files use (`PYTHONPATH: ${WORKSPACE}/lib`): it is left for the
/// engine to expand to the `WORKSPACE` the Dockerfile sets before.
pub fn env_pair(key: &str, value: &str) -> String {
    debug_assert!(!value.contains(['\n', '\r']));
    let mut escaped = String::with_capacity(value.len() + 8);
    let mut rest = value;
    while let Some(c) = rest.chars().next() {
        match c {
            '\\' | '"' => {
                escaped.push('\\');
                escaped.push(c);
            }
            '$' => match workspace_reference(rest) {
                Some(reference) => {
                    escaped.push_str(reference);
                    rest = &rest[reference.len()..];
                    continue;
                }
                None => escaped.push_str("\\$"),
            },
            _ => escaped.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    format!("{key}=\"{escaped}\"")
}

/// `${WORKSPACE}`, or `$WORKSPACE` not followed by more of a variable name, at the start of `s`.
fn workspace_reference(s: &str) -> Option<&'static str> {
    if s.starts_with("${WORKSPACE}") {
        return Some("${WORKSPACE}");
    }
    let after = s.strip_prefix("$WORKSPACE")?;
    (!after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')).then_some("$WORKSPACE")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_deterministic_and_limited() {
        let build = || {
            let mut c = ContextTar::new(1 << 20);
            c.file("workspace/a/b.txt", b"hello", false).unwrap();
            c.file("workspace/run.sh", b"#!/bin/sh\n", true).unwrap();
            c.finish().unwrap()
        };
        assert_eq!(build(), build());
        let mut archive = tar::Archive::new(std::io::Cursor::new(build()));
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "workspace/",
                "workspace/a/",
                "workspace/a/b.txt",
                "workspace/run.sh"
            ]
        );

        let mut small = ContextTar::new(2000);
        let e = small.file("big", &[0u8; 4096], false).unwrap_err();
        assert!(e.message.contains("build.max_context_bytes"), "{e}");
        let mut twice = ContextTar::new(1 << 20);
        twice.file("x", b"1", false).unwrap();
        assert!(twice.file("x", b"2", false).is_err());
    }

    #[test]
    fn quoting_keeps_values_inside_their_instruction() {
        assert_eq!(json("echo \"hi\" \\"), r#""echo \"hi\" \\""#);
        assert_eq!(env_pair("A", r#"x" \"#), r#"A="x\" \\""#);
    }

    #[test]
    fn env_values_reach_the_image_unexpanded() {
        // Nothing the Dockerfile parser would expand or unescape is left bare.
        assert_eq!(
            env_pair("A", r#"$(id) ${PATH} "q"#),
            r#"A="\$(id) \${PATH} \"q""#
        );
        assert_eq!(
            env_pair("B", r#"\$x \\ $ $$ end\"#),
            r#"B="\\\$x \\\\ \$ \$\$ end\\""#
        );
        // The format's workspace reference stays for the engine to expand.
        assert_eq!(
            env_pair(
                "C",
                "${WORKSPACE}/lib:$WORKSPACE:$WORKSPACE_X:${WORKSPACEX}"
            ),
            r#"C="${WORKSPACE}/lib:$WORKSPACE:\$WORKSPACE_X:\${WORKSPACEX}""#
        );
        assert_eq!(env_pair("D", "é$"), r#"D="é\$""#);
    }
}
