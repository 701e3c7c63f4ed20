//! The build file of a `build` job (`yaml_content`): the pyats-image-builder format, parsed
//! strictly into typed values, every value checked before anything is fetched or built.
//!
//! Invariants this module guarantees to the rest of the build:
//! - no value holds a line break or a NUL, so none can start a Dockerfile instruction;
//! - every destination (`files` keys, `repositories` names) is a normalized relative path inside
//!   the workspace, outside `installation/`;
//! - `cmds` are shell commands only, never Dockerfile instructions;
//! - local paths are only ever named, never read here (the allow-list is checked when fetching).

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::discovery::JobRules;

/// The top-level keys of the format (pyats-image-builder's build file, as this worker supports it).
pub const KNOWN_KEYS: &[&str] = &[
    "packages",
    "python",
    "env",
    "files",
    "repositories",
    "jobfiles",
    "pip-config",
    "proxy",
    "cmds",
    "tag",
];

/// Dockerfile instructions a `cmds` entry must not start with (it is run with `RUN` only).
const INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// Why a build file is refused (the job fails with `invalid_job`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("build file: {0}")]
pub struct BuildFileError(pub String);

fn err<T>(message: impl Into<String>) -> Result<T, BuildFileError> {
    Err(BuildFileError(message.into()))
}

/// A string, number or boolean (the format allows all three for `python` and `env` values).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Scalar {
    String(String),
    Bool(bool),
    Number(serde_yaml::Number),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Self::String(s) => s.clone(),
            Self::Bool(b) => b.to_string(),
            Self::Number(n) => n.to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuildFile {
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    python: Option<Scalar>,
    #[serde(default)]
    env: Mapping,
    #[serde(default)]
    files: Vec<Value>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default, rename = "pip-config")]
    pip_config: Option<Value>,
    #[serde(default)]
    repositories: Mapping,
    #[serde(default)]
    proxy: Proxy,
    #[serde(default)]
    cmds: Cmds,
    #[serde(default)]
    jobfiles: RawJobFiles,
}

/// Proxy settings for the build only (build args and the worker's own downloads); never set in
/// the image.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
pub struct Proxy {
    pub HTTP_PROXY: Option<String>,
    pub http_proxy: Option<String>,
    pub HTTPS_PROXY: Option<String>,
    pub https_proxy: Option<String>,
    pub FTP_PROXY: Option<String>,
    pub ftp_proxy: Option<String>,
    pub NO_PROXY: Option<String>,
    pub no_proxy: Option<String>,
    pub SOCKS_PROXY: Option<String>,
    pub socks_proxy: Option<String>,
}

impl Proxy {
    /// The set variables, as `(name, value)`.
    pub fn vars(&self) -> Vec<(&'static str, &str)> {
        [
            ("HTTP_PROXY", &self.HTTP_PROXY),
            ("http_proxy", &self.http_proxy),
            ("HTTPS_PROXY", &self.HTTPS_PROXY),
            ("https_proxy", &self.https_proxy),
            ("FTP_PROXY", &self.FTP_PROXY),
            ("ftp_proxy", &self.ftp_proxy),
            ("NO_PROXY", &self.NO_PROXY),
            ("no_proxy", &self.no_proxy),
            ("SOCKS_PROXY", &self.SOCKS_PROXY),
            ("socks_proxy", &self.socks_proxy),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }

    /// The proxy for `http` or `https` downloads.
    pub fn for_scheme(&self, scheme: &str) -> Option<&str> {
        match scheme {
            "https" => self.HTTPS_PROXY.as_deref().or(self.https_proxy.as_deref()),
            _ => self.HTTP_PROXY.as_deref().or(self.http_proxy.as_deref()),
        }
    }

    pub fn no_proxy(&self) -> Option<&str> {
        self.NO_PROXY.as_deref().or(self.no_proxy.as_deref())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cmds {
    pre: Option<String>,
    post: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobFiles {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    r#match: Option<OneOrMany>,
    #[serde(default)]
    glob: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    url: String,
    #[serde(default)]
    commit_id: Option<String>,
    #[serde(default)]
    credentials: Option<RepoCredentials>,
    #[serde(default)]
    ssh_key: Option<String>,
    #[serde(default)]
    requirements_file: bool,
}

/// A repository's HTTP credentials; given to git through askpass, never on a command line.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RepoCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RepoCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoCredentials(********)")
    }
}

/// Where a `files` entry comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum FileSource {
    /// An `http` or `https` URL, fetched by the worker.
    Url(String),
    /// An absolute path on the worker host; read only under `build.files_allow`.
    Local(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileEntry {
    /// Destination relative to the workspace.
    pub dest: String,
    pub source: FileSource,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Repository {
    /// Directory relative to the workspace.
    pub name: String,
    pub url: String,
    pub commit_id: Option<String>,
    pub credentials: Option<RepoCredentials>,
    pub ssh_key: Option<String>,
    pub requirements_file: bool,
}

/// A checked build file.
#[derive(Debug, Clone)]
pub struct BuildFile {
    pub tag: Option<String>,
    /// Python version (`3`, `3.11`, `3.11.9`).
    pub python: Option<String>,
    /// Environment of the image, in file order.
    pub env: Vec<(String, String)>,
    pub files: Vec<FileEntry>,
    pub packages: Vec<String>,
    /// The `pip.conf` text.
    pub pip_config: Option<String>,
    pub repositories: Vec<Repository>,
    pub proxy: Proxy,
    /// Shell commands run before and after `pip install`.
    pub cmds_pre: Option<String>,
    pub cmds_post: Option<String>,
    pub jobfiles: JobRules,
}

/// Parses and checks `text`. `max_bytes` caps the document; YAML aliases are refused outright
/// (a build file has no use for them, and they are how "billion laughs" documents grow).
pub fn parse(text: &str, max_bytes: usize) -> Result<BuildFile, BuildFileError> {
    if text.len() > max_bytes {
        return err(format!(
            "it is {} bytes, more than the limit of {max_bytes}",
            text.len()
        ));
    }
    if uses_aliases(text) {
        return err(
            "YAML anchors and aliases (&name, *name) are not allowed in a build file".to_string(),
        );
    }
    let value: Value = serde_yaml::from_str(text)
        .map_err(|e| BuildFileError(format!("it is not valid YAML: {e}")))?;
    let map = match value {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        _ => return err("it must be a mapping of keys (packages, repositories, ...)"),
    };
    let unknown: Vec<String> = map
        .keys()
        .map(|k| match k {
            Value::String(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
        .collect();
    if !unknown.is_empty() {
        return err(format!(
            "unknown keys: {} (the keys are: {})",
            unknown.join(", "),
            KNOWN_KEYS.join(", ")
        ));
    }
    let raw: RawBuildFile =
        serde_yaml::from_value(Value::Mapping(map)).map_err(|e| BuildFileError(e.to_string()))?;
    check(raw)
}

/// Whether the document uses an anchor or an alias. Scans YAML tokens outside quoted scalars and
/// comments; a plain scalar like `a&b` (no anchor) is not mistaken for one.
fn uses_aliases(text: &str) -> bool {
    for line in text.lines() {
        let mut in_single = false;
        let mut in_double = false;
        let mut prev: Option<char> = None;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' if !in_double => in_single = !in_single,
                '"' if !in_single && prev != Some('\\') => in_double = !in_double,
                '#' if !in_single && !in_double && prev.is_none_or(char::is_whitespace) => break,
                '&' | '*' if !in_single && !in_double => {
                    let at_token_start =
                        prev.is_none_or(|p| p.is_whitespace() || "[{,:-".contains(p));
                    let named = chars
                        .peek()
                        .is_some_and(|n| !n.is_whitespace() && !",[]{}".contains(*n));
                    if at_token_start && named {
                        return true;
                    }
                }
                _ => {}
            }
            prev = Some(c);
        }
    }
    false
}

/// A value that will reach a Dockerfile or a context file must be a single line.
fn single_line(what: &str, value: &str) -> Result<(), BuildFileError> {
    if value.contains(['\n', '\r', '\0']) {
        return err(format!(
            "{what} contains a line break or NUL; values must be single lines"
        ));
    }
    Ok(())
}

/// A destination inside the workspace: relative, normalized, no `..`, not `installation/`.
pub fn workspace_path(what: &str, path: &str) -> Result<String, BuildFileError> {
    single_line(what, path)?;
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return err(format!("{what}: empty path"));
    }
    if trimmed.starts_with('/') {
        return err(format!(
            "{what} {path:?} is absolute; destinations are relative to the workspace"
        ));
    }
    let mut parts = Vec::new();
    for part in trimmed.split('/') {
        match part {
            "" | "." => continue,
            ".." => {
                return err(format!(
                    "{what} {path:?} leaves the workspace (..); destinations stay inside it"
                ));
            }
            p if p.contains('\\') => {
                return err(format!("{what} {path:?} contains a backslash"));
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return err(format!("{what} {path:?} names the workspace itself"));
    }
    if parts[0] == "installation" {
        return err(format!(
            "{what} {path:?} is inside installation/, which the worker writes"
        ));
    }
    Ok(parts.join("/"))
}

fn check(raw: RawBuildFile) -> Result<BuildFile, BuildFileError> {
    let python = match &raw.python {
        None => None,
        Some(v) => {
            let version = v.text();
            let ok = !version.is_empty()
                && version.split('.').count() <= 3
                && version
                    .split('.')
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
            if !ok {
                return err(format!(
                    "python {version:?} is not a version like 3, 3.11 or 3.11.9 (quote it: \"3.10\")"
                ));
            }
            Some(version)
        }
    };
    if let Some(tag) = &raw.tag {
        single_line("tag", tag)?;
    }

    let mut env = Vec::new();
    for (k, v) in &raw.env {
        let Value::String(key) = k else {
            return err(format!("env: key {k:?} is not a string"));
        };
        let valid_name = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return err(format!(
                "env: {key:?} is not a variable name (letters, digits, _; not starting with a digit)"
            ));
        }
        let value: Scalar = serde_yaml::from_value(v.clone()).map_err(|_| {
            BuildFileError(format!(
                "env.{key}: the value must be a string, number or boolean"
            ))
        })?;
        let value = value.text();
        single_line(&format!("env.{key}"), &value)?;
        env.push((key.clone(), value));
    }

    let mut packages = Vec::new();
    for (i, p) in raw.packages.iter().enumerate() {
        single_line(&format!("packages[{i}]"), p)?;
        let p = p.trim();
        if !p.is_empty() {
            packages.push(p.to_string());
        }
    }

    let mut destinations = BTreeSet::new();
    let mut files = Vec::new();
    for (i, entry) in raw.files.iter().enumerate() {
        let what = format!("files[{i}]");
        let (dest, source) = match entry {
            Value::String(s) => (None, s.clone()),
            Value::Mapping(m) if m.len() == 1 => {
                let (k, v) = m.iter().next().expect("one entry");
                match (k, v) {
                    (Value::String(k), Value::String(v)) => (Some(k.clone()), v.clone()),
                    _ => return err(format!("{what}: expected `name: source`, both strings")),
                }
            }
            _ => {
                return err(format!(
                    "{what}: expected a source string or a one-key mapping `name: source`"
                ));
            }
        };
        single_line(&what, &source)?;
        let source_kind = file_source(&what, &source)?;
        let dest = match dest {
            Some(d) => d,
            None => {
                let path = match &source_kind {
                    FileSource::Url(u) => url::Url::parse(u)
                        .map(|u| u.path().to_string())
                        .unwrap_or_default(),
                    FileSource::Local(p) => p.clone(),
                };
                path.trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            }
        };
        let dest = workspace_path(&format!("{what} destination"), &dest)?;
        if !destinations.insert(dest.clone()) {
            return err(format!("{what}: {dest} is already taken by another entry"));
        }
        files.push(FileEntry {
            dest,
            source: source_kind,
        });
    }

    let mut repositories = Vec::new();
    for (k, v) in &raw.repositories {
        let Value::String(name) = k else {
            return err(format!("repositories: name {k:?} is not a string"));
        };
        let what = format!("repositories.{name}");
        let name = workspace_path(&what, name)?;
        let repo: RawRepository = serde_yaml::from_value(v.clone())
            .map_err(|e| BuildFileError(format!("{what}: {e}")))?;
        single_line(&format!("{what}.url"), &repo.url)?;
        if repo.url.trim().is_empty() || repo.url.starts_with('-') {
            return err(format!("{what}.url is not a git URL"));
        }
        if let Some(c) = &repo.commit_id {
            let ok = !c.is_empty()
                && !c.starts_with('-')
                && c.len() <= 255
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._/-".contains(ch));
            if !ok {
                return err(format!(
                    "{what}.commit_id {c:?} is not a commit, branch or tag"
                ));
            }
        }
        if let Some(c) = &repo.credentials {
            single_line(&format!("{what}.credentials.username"), &c.username)?;
            single_line(&format!("{what}.credentials.password"), &c.password)?;
        }
        if !destinations.insert(name.clone()) {
            return err(format!("{what}: {name} is already taken by another entry"));
        }
        repositories.push(Repository {
            name,
            url: repo.url.trim().to_string(),
            commit_id: repo.commit_id,
            credentials: repo.credentials,
            ssh_key: repo.ssh_key,
            requirements_file: repo.requirements_file,
        });
    }
    // A destination inside another (`a` and `a/b`) would make one overwrite the other.
    for d in &destinations {
        if let Some(parent) = destinations
            .iter()
            .find(|p| *p != d && d.starts_with(&format!("{p}/")))
        {
            return err(format!("{d} is inside {parent}, which another entry fills"));
        }
    }

    for (name, value) in raw.proxy.vars() {
        single_line(&format!("proxy.{name}"), value)?;
    }

    let cmds_pre = raw
        .cmds
        .pre
        .as_deref()
        .map(|c| shell_command("cmds.pre", c))
        .transpose()?
        .flatten();
    let cmds_post = raw
        .cmds
        .post
        .as_deref()
        .map(|c| shell_command("cmds.post", c))
        .transpose()?
        .flatten();

    let pip_config = raw.pip_config.as_ref().map(pip_conf).transpose()?;

    let r#match = match raw.jobfiles.r#match {
        None => None,
        Some(OneOrMany::One(m)) => Some(vec![m]),
        Some(OneOrMany::Many(ms)) if ms.is_empty() => None,
        Some(OneOrMany::Many(ms)) => Some(ms),
    };
    let r#match = match r#match {
        None => None,
        Some(list) => {
            for m in &list {
                single_line("jobfiles.match", m)?;
                regex::Regex::new(m)
                    .map_err(|e| BuildFileError(format!("jobfiles.match {m:?}: {e}")))?;
            }
            Some(if list.len() == 1 {
                list[0].clone()
            } else {
                list.iter()
                    .map(|m| format!("(?:{m})"))
                    .collect::<Vec<_>>()
                    .join("|")
            })
        }
    };
    for g in &raw.jobfiles.glob {
        single_line("jobfiles.glob", g)?;
    }
    let mut paths = Vec::new();
    for p in &raw.jobfiles.paths {
        single_line("jobfiles.paths", p)?;
        let relative = p
            .strip_prefix(crate::build::WORKSPACE)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(p);
        let relative = workspace_path_any("jobfiles.paths", relative)?;
        paths.push(format!("{}/{relative}", crate::build::WORKSPACE));
    }

    Ok(BuildFile {
        tag: raw.tag,
        python,
        env,
        files,
        packages,
        pip_config,
        repositories,
        proxy: raw.proxy,
        cmds_pre,
        cmds_post,
        jobfiles: JobRules {
            r#match,
            glob: raw.jobfiles.glob,
            paths,
        },
    })
}

/// Like [`workspace_path`], but `installation/` is fine (it is only read).
fn workspace_path_any(what: &str, path: &str) -> Result<String, BuildFileError> {
    match workspace_path(what, path) {
        Err(e) if e.0.contains("installation/") => Ok(path.trim_matches('/').to_string()),
        other => other,
    }
}

fn file_source(what: &str, source: &str) -> Result<FileSource, BuildFileError> {
    match source.split_once("://") {
        Some((scheme, _)) => match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" => {
                url::Url::parse(source)
                    .map_err(|e| BuildFileError(format!("{what}: {source:?} is not a URL: {e}")))?;
                Ok(FileSource::Url(source.to_string()))
            }
            other => err(format!(
                "{what}: {other}:// is not supported; files are http(s) URLs or paths under the worker's build.files_allow"
            )),
        },
        None if source.starts_with('/') => Ok(FileSource::Local(source.to_string())),
        None => err(format!(
            "{what}: {source:?} is neither an http(s) URL nor an absolute path"
        )),
    }
}

/// A `cmds` entry as a shell command: a leading `RUN` (the format's Dockerfile form) is
/// accepted and dropped; any other instruction is refused.
fn shell_command(what: &str, cmd: &str) -> Result<Option<String>, BuildFileError> {
    single_line(what, cmd)?;
    let cmd = cmd.trim();
    if cmd.is_empty() {
        return Ok(None);
    }
    let first = cmd.split_whitespace().next().unwrap_or_default();
    // Instructions are matched in capitals, as Dockerfiles write them: `env`, `add` or `user`
    // in lower case are ordinary commands (and would run as such).
    let cmd = if first == "RUN" {
        cmd[first.len()..].trim()
    } else if INSTRUCTIONS.contains(&first) {
        return err(format!(
            "{what} starts with the Dockerfile instruction {first}; cmds are shell commands, run with RUN only"
        ));
    } else {
        cmd
    };
    Ok((!cmd.is_empty()).then(|| cmd.to_string()))
}

/// `pip-config` as `pip.conf` text: a mapping of sections, or the file's text as a string.
fn pip_conf(value: &Value) -> Result<String, BuildFileError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Mapping(sections) => {
            let mut out = String::new();
            for (section, entries) in sections {
                let Value::String(section) = section else {
                    return err("pip-config: section names must be strings");
                };
                if section.contains(['[', ']', '\n', '\r']) || section.trim().is_empty() {
                    return err(format!("pip-config: bad section name {section:?}"));
                }
                let Value::Mapping(entries) = entries else {
                    return err(format!(
                        "pip-config.{section}: expected a mapping of options"
                    ));
                };
                out.push_str(&format!("[{section}]\n"));
                for (k, v) in entries {
                    let Value::String(k) = k else {
                        return err(format!(
                            "pip-config.{section}: option names must be strings"
                        ));
                    };
                    if k.contains(['=', ':', '\n', '\r', '[']) || k.trim().is_empty() {
                        return err(format!("pip-config.{section}: bad option name {k:?}"));
                    }
                    let text = match v {
                        Value::Sequence(items) => items
                            .iter()
                            .map(|i| serde_yaml::from_value::<Scalar>(i.clone()).map(|s| s.text()))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|_| {
                                BuildFileError(format!(
                                    "pip-config.{section}.{k}: list items must be scalars"
                                ))
                            })?
                            .join("\n"),
                        other => serde_yaml::from_value::<Scalar>(other.clone())
                            .map(|s| s.text())
                            .map_err(|_| {
                                BuildFileError(format!(
                                    "pip-config.{section}.{k}: expected a scalar or a list"
                                ))
                            })?,
                    };
                    // Continuation lines of an ini value are indented.
                    let text = text.trim().replace('\r', "").replace('\n', "\n    ");
                    out.push_str(&format!("{k} = {text}\n"));
                }
                out.push('\n');
            }
            Ok(out)
        }
        _ => err("pip-config: expected a mapping of sections or the file's text"),
    }
}

/// Every secret a build file holds (repository passwords and usernames, ssh keys, proxy URL
/// passwords), found even when the file is not valid: the job's mask needs them before parsing
/// can fail and echo the file.
pub fn secret_values(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    if !uses_aliases(text)
        && let Ok(value) = serde_yaml::from_str::<Value>(text)
    {
        collect_secrets(&value, &mut out);
    }
    // A file that does not parse is still echoed: take `password:`/`ssh_key:` values by line.
    static LINE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = LINE.get_or_init(|| {
        regex::Regex::new(
            r##"(?m)^\s*(?:password|ssh_key|token)\s*:\s*['"]?([^'"\s#][^'"#]*?)['"]?\s*$"##,
        )
        .unwrap()
    });
    for cap in re.captures_iter(text) {
        out.push(cap[1].to_string());
    }
    out
}

fn collect_secrets(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                let key = k.as_str().unwrap_or_default();
                match (key, v) {
                    ("credentials", Value::Mapping(c)) => {
                        for field in ["username", "password"] {
                            if let Some(Value::String(s)) = c.get(field) {
                                out.push(s.clone());
                            }
                        }
                    }
                    ("ssh_key", Value::String(key)) => {
                        out.push(key.clone());
                        out.push(key.trim().to_string());
                        // The key also appears line by line (a YAML block, a log line).
                        out.extend(
                            key.lines()
                                .map(str::trim)
                                .filter(|l| l.len() >= 8)
                                .map(str::to_string),
                        );
                    }
                    (_, Value::String(s)) if crate::secrets::is_secret_field(key) => {
                        out.push(s.clone())
                    }
                    (_, Value::String(s)) if s.contains("://") && s.contains('@') => {
                        // user:password@ in a proxy or repository URL.
                        if let Ok(u) = url::Url::parse(s)
                            && let Some(p) = u.password()
                        {
                            out.push(p.to_string());
                            if let Some(decoded) = percent_decode(p) {
                                out.push(decoded);
                            }
                        }
                    }
                    _ => collect_secrets(v, out),
                }
            }
        }
        Value::Sequence(items) => items.iter().for_each(|v| collect_secrets(v, out)),
        _ => {}
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 256 * 1024;

    fn ok(text: &str) -> BuildFile {
        parse(text, LIMIT).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn refused(text: &str) -> String {
        parse(text, LIMIT).expect_err(text).0
    }

    #[test]
    fn parses_the_format() {
        let f = ok(r#"
tag: "mypyatsimage:latest"
python: 3.11
env:
  VAR1: VALUE1
  PYTHONPATH: ${WORKSPACE}/repo1
  N: 3
files:
  - https://example.com/path/file4
  - myfile_5: https://example.com/path/file5
  - dir/file3: /srv/shared/file3
packages:
  - pyats[full]>=20.1,<20.2
  - otherpackage1==1.0
pip-config:
  global:
    disable-pip-version-check: 1
    trusted-host: [a.example, b.example]
repositories:
  repo1:
    url: https://git.example.com/a.git
    commit_id: abcd1234
    credentials: {username: bob, password: hunter2-long}
  dir/repo2:
    url: ssh://git@git.example.com/b.git
    ssh_key: KEY
proxy:
  HTTP_PROXY: http://127.0.0.1:1111
cmds:
  pre: RUN echo pre
  post: echo post
jobfiles:
  paths: [repo1/job.py]
  match: ['.*_job\.py$', '.*run.*\.py$']
  glob: ['repo1/**/*.py']
"#);
        assert_eq!(f.python.as_deref(), Some("3.11"));
        assert_eq!(
            f.env,
            vec![
                ("VAR1".to_string(), "VALUE1".to_string()),
                ("PYTHONPATH".to_string(), "${WORKSPACE}/repo1".to_string()),
                ("N".to_string(), "3".to_string())
            ]
        );
        assert_eq!(f.files[0].dest, "file4");
        assert_eq!(f.files[1].dest, "myfile_5");
        assert_eq!(
            f.files[2],
            FileEntry {
                dest: "dir/file3".into(),
                source: FileSource::Local("/srv/shared/file3".into())
            }
        );
        assert_eq!(f.packages.len(), 2);
        assert_eq!(
            f.pip_config.as_deref(),
            Some(
                "[global]\ndisable-pip-version-check = 1\ntrusted-host = a.example\n    b.example\n\n"
            )
        );
        assert_eq!(f.repositories[1].name, "dir/repo2");
        assert_eq!(f.repositories[0].commit_id.as_deref(), Some("abcd1234"));
        assert_eq!(f.cmds_pre.as_deref(), Some("echo pre"));
        assert_eq!(f.cmds_post.as_deref(), Some("echo post"));
        assert_eq!(f.proxy.for_scheme("http"), Some("http://127.0.0.1:1111"));
        assert_eq!(f.jobfiles.paths, vec!["/pyats/repo1/job.py"]);
        assert_eq!(
            f.jobfiles.r#match.as_deref(),
            Some(r"(?:.*_job\.py$)|(?:.*run.*\.py$)")
        );
        assert!(!format!("{f:?}").contains("hunter2-long"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = refused("packages: [a]\nsnapshot: /x.yaml\nlinux_packages: [gcc]\n");
        assert!(e.contains("unknown keys: snapshot, linux_packages"), "{e}");
        let e = refused("repositories:\n  r: {url: u, branch: main}\n");
        assert!(e.contains("repositories.r") && e.contains("branch"), "{e}");
        let e = refused("cmds: {during: x}\n");
        assert!(e.contains("during"), "{e}");
    }

    #[test]
    fn oversized_and_alias_bombs_are_refused() {
        let big = format!("packages:\n{}", "  - aaaaaaaaaaaaaaaaaaaa\n".repeat(20_000));
        let e = parse(&big, LIMIT).unwrap_err().0;
        assert!(e.contains("more than the limit of 262144"), "{e}");
        let bomb = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n\
                    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n\
                    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n\
                    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n\
                    packages: *d\n";
        let started = std::time::Instant::now();
        let e = refused(bomb);
        assert!(e.contains("anchors and aliases"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Ampersands and stars inside values are not aliases.
        let f = ok("packages: ['a&b', \"*c\"]\nenv: {A: x&y, B: '2*3'}\ncmds: {pre: 'a && b *'}\n");
        assert_eq!(f.packages, vec!["a&b", "*c"]);
    }

    /// Security: no value can start a Dockerfile instruction (line breaks are refused).
    #[test]
    fn values_with_line_breaks_are_refused() {
        for (text, want) in [
            ("packages: [\"ok\\nRUN touch /pwned\"]", "packages[0]"),
            ("env: {A: \"x\\nRUN touch /pwned\"}", "env.A"),
            ("env: {\"A B\": x}", "not a variable name"),
            ("env: {\"A=\\nRUN x\": x}", "not a variable name"),
            ("cmds: {pre: \"true\\nCOPY / /host\"}", "cmds.pre"),
            ("cmds: {post: \"true\\rFROM x\"}", "cmds.post"),
            ("files: [{\"a\\nRUN x\": \"https://h/f\"}]", "files[0]"),
            (
                "repositories: {\"r\\nRUN x\": {url: https://h/r.git}}",
                "repositories",
            ),
            (
                "repositories: {r: {url: \"https://h/r.git\\nRUN x\"}}",
                "repositories.r.url",
            ),
            (
                "proxy: {HTTP_PROXY: \"http://p\\nRUN x\"}",
                "proxy.HTTP_PROXY",
            ),
            ("jobfiles: {paths: [\"a\\nb\"]}", "jobfiles.paths"),
        ] {
            let e = refused(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    /// Security: destinations never leave the workspace nor overwrite the worker's files.
    #[test]
    fn destinations_stay_in_the_workspace() {
        for (text, want) in [
            (
                "files: [{../../etc/passwd: \"https://h/f\"}]",
                "leaves the workspace",
            ),
            (
                "files: [{a/../../x: \"https://h/f\"}]",
                "leaves the workspace",
            ),
            ("files: [{/etc/x: \"https://h/f\"}]", "absolute"),
            ("files: [\"https://h/\"]", "empty path"),
            ("files: [\"https://h/..\"]", "empty path"),
            (
                "files: [{installation/jobfiles.txt: \"https://h/f\"}]",
                "installation/",
            ),
            (
                "repositories: {../up: {url: https://h/r.git}}",
                "leaves the workspace",
            ),
            ("repositories: {/abs: {url: https://h/r.git}}", "absolute"),
            (
                "repositories: {.: {url: https://h/r.git}}",
                "workspace itself",
            ),
            (
                "repositories: {r: {url: https://h/r.git}, r/sub: {url: https://h/s.git}}",
                "inside r",
            ),
            (
                "files: [{x: \"https://h/a\"}, {x: \"https://h/b\"}]",
                "already taken",
            ),
            (
                "repositories: {r: {url: '--upload-pack=touch /x'}}",
                "not a git URL",
            ),
            (
                "repositories: {r: {url: u, commit_id: '--orphan'}}",
                "commit_id",
            ),
        ] {
            let e = refused(text);
            assert!(e.contains(want), "{text}: {e}");
        }
        let f = ok("files: [{./a//b/: \"https://h/f\"}]");
        assert_eq!(f.files[0].dest, "a/b");
    }

    /// Security: files come from http(s) or from host paths (checked against the allow-list
    /// later); other schemes are refused.
    #[test]
    fn file_sources_are_urls_or_absolute_paths() {
        for (text, want) in [
            (
                "files: [\"scp://host/etc/passwd\"]",
                "scp:// is not supported",
            ),
            (
                "files: [\"file:///etc/passwd\"]",
                "file:// is not supported",
            ),
            ("files: [\"ftp://host/x\"]", "ftp:// is not supported"),
            (
                "files: [\"relative/path\"]",
                "neither an http(s) URL nor an absolute path",
            ),
        ] {
            let e = refused(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    /// Security: cmds are shell commands for RUN, never other instructions.
    #[test]
    fn cmds_are_shell_commands_only() {
        for cmd in [
            "FROM scratch",
            "COPY / /host",
            "ADD . /x",
            "ENV A=1",
            "ENTRYPOINT x",
            "USER root",
        ] {
            let e = refused(&format!("cmds: {{pre: '{cmd}'}}"));
            assert!(e.contains("Dockerfile instruction"), "{cmd}: {e}");
        }
        let f = ok("cmds: {pre: 'RUN apt-get update', post: 'env > /tmp/env.txt'}");
        assert_eq!(f.cmds_pre.as_deref(), Some("apt-get update"));
        assert_eq!(f.cmds_post.as_deref(), Some("env > /tmp/env.txt"));
    }

    #[test]
    fn python_versions() {
        assert_eq!(ok("python: '3.10'").python.as_deref(), Some("3.10"));
        assert_eq!(ok("python: 3").python.as_deref(), Some("3"));
        assert!(refused("python: '3.11; rm -rf /'").contains("python"));
        assert!(refused("python: latest").contains("python"));
    }

    #[test]
    fn finds_secrets_even_in_broken_files() {
        let text = "repositories:\n  r:\n    url: https://h/r.git\n    credentials: {username: robot-user, password: s3cret-pw}\n    ssh_key: |\n      -----BEGIN OPENSSH PRIVATE KEY-----\n      b3BlbnNzaC1rZXktdjEAAAAA\n      -----END OPENSSH PRIVATE KEY-----\nproxy: {HTTP_PROXY: 'http://u:proxy-pw@p:3128'}\n";
        let s = secret_values(text);
        for want in [
            "robot-user",
            "s3cret-pw",
            "b3BlbnNzaC1rZXktdjEAAAAA",
            "proxy-pw",
        ] {
            assert!(s.iter().any(|v| v == want), "{want} in {s:?}");
        }
        let broken = "repositories: [\n  password: 'very-secret-1'\n";
        assert!(secret_values(broken).iter().any(|v| v == "very-secret-1"));
    }
}
