//! The `git` command line, driven with tokio::process: clones for build files (credentials
//! through askpass and environment variables, never on a command line), and the polaris mirror.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::joblog::JobLog;
use crate::pipeline::JobError;

/// A private scratch directory, removed (with everything in it) when dropped.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(label: &str) -> Result<Self, JobError> {
        let path = std::env::temp_dir().join(format!(
            "image-worker-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| {
                JobError::new(
                    "internal",
                    format!("cannot create a scratch directory {}: {e}", path.display()),
                    true,
                )
            })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// How git authenticates for one clone.
#[derive(Default)]
pub struct GitAuth<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    pub ssh_key: Option<&'a str>,
}

/// A git command: arguments are not secrets; secrets go in `env`.
pub struct Git {
    env: Vec<(String, String)>,
    /// Isolated from the worker user's git configuration (build files), or not (polaris).
    isolated_home: Option<PathBuf>,
}

impl Git {
    /// Git for a build file's repositories: no user or system config, no credential helpers,
    /// no prompts, only well-known transports (`file` only when `allow_file`).
    pub fn isolated(
        scratch: &Scratch,
        auth: &GitAuth<'_>,
        allow_file: bool,
    ) -> Result<Self, JobError> {
        let home = scratch.path().join("home");
        std::fs::create_dir_all(&home)
            .map_err(|e| JobError::new("internal", e.to_string(), false))?;
        let mut env = vec![
            ("GIT_TERMINAL_PROMPT".to_string(), "0".to_string()),
            ("GIT_CONFIG_NOSYSTEM".to_string(), "1".to_string()),
            ("GIT_CONFIG_GLOBAL".to_string(), "/dev/null".to_string()),
            (
                "GIT_ALLOW_PROTOCOL".to_string(),
                if allow_file {
                    "https:http:ssh:git:file"
                } else {
                    "https:http:ssh:git"
                }
                .to_string(),
            ),
            (
                "GIT_SSH_COMMAND".to_string(),
                "ssh -o BatchMode=yes".to_string(),
            ),
        ];
        if auth.username.is_some() || auth.password.is_some() {
            let askpass = scratch.path().join("askpass.sh");
            write_private(
                &askpass,
                b"#!/bin/sh\ncase \"$1\" in\n  Username*|username*) printf '%s\\n' \"$IW_GIT_USERNAME\" ;;\n  *) printf '%s\\n' \"$IW_GIT_PASSWORD\" ;;\nesac\n",
                0o700,
            )?;
            env.push(("GIT_ASKPASS".into(), askpass.display().to_string()));
            env.push((
                "IW_GIT_USERNAME".into(),
                auth.username.unwrap_or_default().to_string(),
            ));
            env.push((
                "IW_GIT_PASSWORD".into(),
                auth.password.unwrap_or_default().to_string(),
            ));
        }
        if let Some(key) = auth.ssh_key {
            let key_file = scratch.path().join("ssh_key");
            let mut text = key.trim().to_string();
            text.push('\n');
            write_private(&key_file, text.as_bytes(), 0o600)?;
            let known_hosts = scratch.path().join("known_hosts");
            env.retain(|(k, _)| k != "GIT_SSH_COMMAND");
            env.push((
                "GIT_SSH_COMMAND".into(),
                format!(
                    "ssh -i '{}' -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile='{}'",
                    key_file.display(),
                    known_hosts.display()
                ),
            ));
        }
        Ok(Self {
            env,
            isolated_home: Some(home),
        })
    }

    /// Adds an environment variable (a proxy setting, say).
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Git as the worker's own user (its configured credentials), without prompts.
    pub fn worker() -> Self {
        Self {
            env: vec![("GIT_TERMINAL_PROMPT".into(), "0".into())],
            isolated_home: None,
        }
    }

    /// Runs `git args...` in `cwd`; each output line goes to the job log (masked). Fails with
    /// the last lines of output.
    pub async fn run(
        &self,
        cwd: Option<&Path>,
        args: &[&str],
        log: &JobLog,
    ) -> Result<String, GitError> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        if let Some(home) = &self.isolated_home {
            cmd.env("HOME", home).env("XDG_CONFIG_HOME", home);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().await.map_err(|e| GitError {
            message: format!("cannot run git: {e}"),
            code: None,
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            log.info(format!("git: {line}"));
        }
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = tail[tail.len().saturating_sub(5)..].join("; ");
            Err(GitError {
                message: format!("git {} failed: {tail}", args.first().copied().unwrap_or("")),
                code: out.status.code(),
            })
        }
    }
}

#[derive(Debug)]
pub struct GitError {
    pub message: String,
    pub code: Option<i32>,
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), JobError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| {
            JobError::new(
                "internal",
                format!("writing {}: {e}", path.display()),
                false,
            )
        })
}

/// The local path of a `file://` URL or a plain path, when the URL names this host's files.
pub fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Some(PathBuf::from(rest));
    }
    let scp_like = !url.contains("://")
        && url
            .split_once(':')
            .is_some_and(|(host, _)| !host.contains('/'));
    (!url.contains("://") && !scp_like).then(|| PathBuf::from(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_local_urls() {
        assert_eq!(
            local_path("file:///srv/r.git"),
            Some(PathBuf::from("/srv/r.git"))
        );
        assert_eq!(local_path("/srv/r.git"), Some(PathBuf::from("/srv/r.git")));
        assert_eq!(local_path("../r.git"), Some(PathBuf::from("../r.git")));
        assert_eq!(local_path("https://h/r.git"), None);
        assert_eq!(local_path("git@github.com:o/r.git"), None);
    }

    #[test]
    fn scratch_is_removed() {
        let s = Scratch::new("t").unwrap();
        let p = s.path().to_path_buf();
        std::fs::write(p.join("f"), b"x").unwrap();
        drop(s);
        assert!(!p.exists());
    }
}
