//! Which files are pyATS jobs: the `jobfiles` rules, the skipped trees, the `PYATS_JOBFILE`
//! marker and the top-level `def main(` test. Nothing here touches an image; both sources feed
//! these functions so they cannot disagree.

use std::collections::BTreeSet;
use std::io::{self, BufRead};

use regex::Regex;

use super::{DiscoveryError, JobRules};

/// The regex pyats-image-builder applies when a build file names no `match`.
pub const DEFAULT_JOB_MATCH: &str = r".*job.*\.py$";

/// pyATS looks for the marker only this far into a file.
pub const MARKER_LINES: usize = 10;

const MARKER: &[u8] = b"PYATS_JOBFILE";

/// Longest line prefix kept when scanning; the rest of an overlong line is skipped, not stored.
const LINE_PREFIX: usize = 4096;

/// Directory names never searched, wherever they are.
const SKIPPED_NAMES: &[&str] = &["site-packages", "__pycache__", ".git"];

/// Paths the engine adds to every container (its init layer and runtime mounts). They are not
/// image content, and inside a running container they come from the host, so no manifest or job
/// is ever read through them.
const RUNTIME_PATHS: &[&str] = &[
    "/.dockerenv",
    "/.dockerinit",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/mtab",
];
const RUNTIME_TREES: &[&str] = &["/dev", "/proc", "/sys"];

/// `JobRules` compiled against one workspace root.
#[derive(Debug)]
pub(crate) struct CompiledRules {
    root: String,
    matcher: Regex,
    globs: Vec<Regex>,
    /// `paths` entries plus `installation/jobfiles.txt` entries, absolute.
    listed: BTreeSet<String>,
}

impl CompiledRules {
    pub(crate) fn new(rules: &JobRules, root: &str) -> Result<Self, DiscoveryError> {
        let pattern = rules.r#match.as_deref().unwrap_or(DEFAULT_JOB_MATCH);
        let matcher = Regex::new(pattern)
            .map_err(|e| DiscoveryError::InvalidRules(format!("match {pattern:?}: {e}")))?;
        let globs = rules
            .glob
            .iter()
            .map(|g| {
                Regex::new(&glob_to_regex(&absolute_under(root, g)))
                    .map_err(|e| DiscoveryError::InvalidRules(format!("glob {g:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let listed = rules
            .paths
            .iter()
            .map(|p| absolute_under(root, p))
            .collect();
        Ok(Self {
            root: root.to_owned(),
            matcher,
            globs,
            listed,
        })
    }

    pub(crate) fn root(&self) -> &str {
        &self.root
    }

    /// Adds the entries of `<root>/installation/jobfiles.txt`; returns warnings for entries
    /// that cannot count (outside the root).
    pub(crate) fn add_jobfiles_txt(&mut self, file: &str, text: &str) -> Vec<String> {
        let mut warnings = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let path = absolute_under(&self.root, line);
            if is_under(&path, &self.root) {
                self.listed.insert(path);
            } else {
                warnings.push(format!(
                    "{file}: entry {line} is outside the workspace root {}",
                    self.root
                ));
            }
        }
        warnings
    }

    /// Whether `path` (absolute, a `.py`) is named a job by `match`, a glob or a listed path.
    /// A file that is not can still be a job through the marker.
    pub(crate) fn is_named_job(&self, path: &str) -> bool {
        self.listed.contains(path)
            || self.matcher.is_match(path)
            || self.globs.iter().any(|g| g.is_match(path))
    }

    pub(crate) fn is_listed(&self, path: &str) -> bool {
        self.listed.contains(path)
    }

    pub(crate) fn listed(&self) -> impl Iterator<Item = &String> {
        self.listed.iter()
    }

    /// Whether a directory (absolute path under the root) is pruned from the search.
    pub(crate) fn is_skipped_dir(&self, dir: &str) -> bool {
        let name = dir.rsplit('/').next().unwrap_or(dir);
        SKIPPED_NAMES.contains(&name) || dir == installation_dir(&self.root)
    }

    /// Whether any directory between the root and `path` is skipped.
    pub(crate) fn in_skipped_dir(&self, path: &str) -> bool {
        let Some(rel) = strip_root(path, &self.root) else {
            return true;
        };
        let mut dir = self.root.trim_end_matches('/').to_owned();
        let mut parts = rel.split('/').filter(|p| !p.is_empty()).peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                return false;
            }
            dir.push('/');
            dir.push_str(part);
            if self.is_skipped_dir(&dir) {
                return true;
            }
        }
        false
    }
}

pub(crate) fn installation_dir(root: &str) -> String {
    join(root, "installation")
}

pub(crate) fn jobfiles_txt(root: &str) -> String {
    join(root, "installation/jobfiles.txt")
}

pub(crate) fn is_runtime_path(path: &str) -> bool {
    RUNTIME_PATHS.contains(&path) || RUNTIME_TREES.iter().any(|t| is_under(path, t))
}

/// `path` relative to `root` (without a leading `/`), if it is `root` or below it.
pub(crate) fn strip_root<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    let root = root.trim_end_matches('/');
    let rest = path.strip_prefix(root)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('/')
            .or(if root.is_empty() { Some(rest) } else { None })
    }
}

pub(crate) fn is_under(path: &str, root: &str) -> bool {
    strip_root(path, root).is_some()
}

pub(crate) fn join(dir: &str, rel: &str) -> String {
    let dir = dir.trim_end_matches('/');
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        if dir.is_empty() {
            "/".into()
        } else {
            dir.into()
        }
    } else {
        format!("{dir}/{rel}")
    }
}

/// Lexically normalises an absolute path: no `.`, `..` clamped at `/`, no duplicate slashes.
pub(crate) fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A rule path: absolute as given, else relative to the root.
fn absolute_under(root: &str, path: &str) -> String {
    if path.starts_with('/') {
        normalize(path)
    } else {
        normalize(&join(root, path))
    }
}

/// Shell-style glob to an anchored regex: `*` and `?` stay within one path component, `**`
/// crosses them, `[...]` is a class (`[!...]` negated).
fn glob_to_regex(glob: &str) -> String {
    let mut out = String::from("^");
    let chars: Vec<char> = glob.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                if chars.get(i + 2) == Some(&'/') {
                    out.push_str("(?:.*/)?");
                    i += 3;
                } else {
                    out.push_str(".*");
                    i += 2;
                }
                continue;
            }
            '*' => out.push_str("[^/]*"),
            '?' => out.push_str("[^/]"),
            '[' => match chars[i + 1..].iter().position(|&c| c == ']') {
                Some(len) => {
                    let class: String = chars[i + 1..i + 1 + len].iter().collect();
                    let class = class
                        .strip_prefix('!')
                        .map(|c| format!("^{c}"))
                        .unwrap_or(class);
                    out.push('[');
                    out.push_str(&class.replace('\\', "\\\\"));
                    out.push(']');
                    i += len + 2;
                    continue;
                }
                None => out.push_str("\\["),
            },
            c => out.push_str(&regex::escape(&c.to_string())),
        }
        i += 1;
    }
    out.push('$');
    out
}

/// Whether a `.py` file is a job, reading only as much as needed: the first lines for the
/// marker, then lines until a top-level `def main(`. `named` says the rules already name it.
pub(crate) fn is_job_source(reader: &mut impl BufRead, named: bool) -> io::Result<bool> {
    let mut marked = false;
    let mut has_main = false;
    let mut line = Vec::with_capacity(256);
    let mut number = 0;
    while read_line_prefix(reader, &mut line)? {
        number += 1;
        if number <= MARKER_LINES && contains(&line, MARKER) {
            marked = true;
        }
        if !has_main && is_top_level_main(&line) {
            has_main = true;
        }
        if has_main && (named || marked) {
            return Ok(true);
        }
        if number >= MARKER_LINES && !named && !marked {
            return Ok(false);
        }
    }
    Ok(false)
}

/// `def main(` at column 0 (spaces allowed around the name, as Python allows).
pub(crate) fn is_top_level_main(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"def") else {
        return false;
    };
    let Some(first) = rest.first() else {
        return false;
    };
    if *first != b' ' && *first != b'\t' {
        return false;
    }
    let rest = rest.trim_ascii_start();
    let Some(rest) = rest.strip_prefix(b"main") else {
        return false;
    };
    rest.trim_ascii_start().starts_with(b"(")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads one line into `line` keeping at most `LINE_PREFIX` bytes of it. False at end of input.
fn read_line_prefix(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<bool> {
    line.clear();
    let mut any = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(any);
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1),
            None => (buf, buf.len()),
        };
        let room = LINE_PREFIX.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let newline = done > chunk.len();
        reader.consume(done);
        if newline {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(r#match: Option<&str>, glob: &[&str], paths: &[&str]) -> CompiledRules {
        let rules = JobRules {
            r#match: r#match.map(Into::into),
            glob: glob.iter().map(|s| s.to_string()).collect(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
        };
        CompiledRules::new(&rules, "/pyats").unwrap()
    }

    fn job(text: &str, named: bool) -> bool {
        is_job_source(&mut text.as_bytes(), named).unwrap()
    }

    #[test]
    fn default_match_is_the_builder_regex() {
        let r = rules(None, &[], &[]);
        assert!(r.is_named_job("/pyats/dest/basic_example_job.py"));
        assert!(r.is_named_job("/pyats/jobs/x.py"));
        assert!(!r.is_named_job("/pyats/dest/helper_script.py"));
        assert!(!r.is_named_job("/pyats/dest/my_job.pyc"));
    }

    #[test]
    fn globs_and_paths_are_relative_to_the_root() {
        let r = rules(
            Some("^$"),
            &["tests/*_runner.py", "/abs/**/x.py", "suite?/[!a]*.py"],
            &["one.py", "/pyats/two.py"],
        );
        assert!(r.is_named_job("/pyats/tests/suite_runner.py"));
        assert!(!r.is_named_job("/pyats/tests/deeper/suite_runner.py"));
        assert!(r.is_named_job("/abs/x.py"));
        assert!(r.is_named_job("/abs/a/b/x.py"));
        assert!(r.is_named_job("/pyats/suite1/b.py"));
        assert!(!r.is_named_job("/pyats/suite1/a.py"));
        assert!(r.is_named_job("/pyats/one.py"));
        assert!(r.is_named_job("/pyats/two.py"));
        assert!(!r.is_named_job("/pyats/three_job.py"));
    }

    #[test]
    fn invalid_rules_are_an_error() {
        let bad = JobRules {
            r#match: Some("(".into()),
            ..Default::default()
        };
        assert!(matches!(
            CompiledRules::new(&bad, "/pyats"),
            Err(DiscoveryError::InvalidRules(_))
        ));
    }

    #[test]
    fn jobfiles_txt_entries_count_inside_the_root_only() {
        let mut r = rules(Some("^$"), &[], &[]);
        let warnings = r.add_jobfiles_txt(
            "/pyats/installation/jobfiles.txt",
            "/pyats/a.py\nb/c.py\n\n# x\n/etc/d.py\n",
        );
        assert!(r.is_named_job("/pyats/a.py"));
        assert!(r.is_named_job("/pyats/b/c.py"));
        assert!(!r.is_named_job("/etc/d.py"));
        assert_eq!(
            warnings,
            [
                "/pyats/installation/jobfiles.txt: entry /etc/d.py is outside the workspace root /pyats"
            ]
        );
    }

    #[test]
    fn skipped_trees() {
        let r = rules(None, &[], &[]);
        assert!(r.is_skipped_dir("/pyats/installation"));
        assert!(!r.is_skipped_dir("/pyats/dest/installation"));
        assert!(r.is_skipped_dir("/pyats/lib/python3.11/site-packages"));
        assert!(r.is_skipped_dir("/pyats/x/__pycache__"));
        assert!(r.is_skipped_dir("/pyats/.git"));
        assert!(r.in_skipped_dir("/pyats/.git/hooks/hook_job.py"));
        assert!(r.in_skipped_dir("/pyats/installation/setup_job.py"));
        assert!(!r.in_skipped_dir("/pyats/dest/basic/a_job.py"));
        assert!(
            !r.in_skipped_dir("/pyats/site-packages"),
            "a file named like a skipped dir is fine"
        );
        assert!(r.in_skipped_dir("/other/a_job.py"), "outside the root");
    }

    #[test]
    fn def_main_must_be_top_level() {
        assert!(job("import os\n\ndef main(runtime):\n    pass\n", true));
        assert!(job("def  main (runtime):\n", true));
        assert!(job("def main(", true));
        assert!(!job("def mainly(runtime):\n", true));
        assert!(!job("class A:\n    def main(self):\n        pass\n", true));
        assert!(!job("async def main():\n", true));
        assert!(!job("# def main(\n", true));
        assert!(!job("def main_loop():\n", true));
    }

    #[test]
    fn marker_counts_in_the_first_ten_lines_only() {
        let at = |n: usize| {
            let mut text = String::new();
            for i in 1..n {
                text.push_str(&format!("# line {i}\n"));
            }
            text.push_str("# PYATS_JOBFILE\n\ndef main(runtime):\n    pass\n");
            job(&text, false)
        };
        assert!(at(1));
        assert!(at(2));
        assert!(at(10));
        assert!(!at(11));
        assert!(!at(12));
        assert!(
            job("def main():\n    pass\n# PYATS_JOBFILE\n", false),
            "main before the marker"
        );
        assert!(!job("# PYATS_JOBFILE\n", false), "marker without main");
        assert!(!job("def main():\n", false), "main without marker or name");
    }

    #[test]
    fn overlong_lines_do_not_hide_main() {
        let text = format!("x = '{}'\ndef main():\n", "a".repeat(100_000));
        assert!(job(&text, true));
        let text = format!("{}def main():\n", "a".repeat(100_000));
        assert!(!job(&text, true), "not at column 0 of a line");
    }

    #[test]
    fn paths() {
        assert_eq!(normalize("/a/./b//c/../../../../x"), "/x");
        assert_eq!(strip_root("/pyats/a", "/pyats"), Some("a"));
        assert_eq!(strip_root("/pyats", "/pyats"), Some(""));
        assert_eq!(strip_root("/pyatsx/a", "/pyats"), None);
        assert_eq!(strip_root("/a", "/"), Some("a"));
        assert_eq!(join("/", "a"), "/a");
        assert!(is_runtime_path("/etc/hostname"));
        assert!(is_runtime_path("/proc/mounts"));
        assert!(!is_runtime_path("/etc/shadow"));
    }
}
