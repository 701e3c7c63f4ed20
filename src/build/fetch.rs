//! `files` entries of a build file: downloaded over http(s), or read from this host only under
//! `build.files_allow`. Whatever they hold goes into the in-memory context.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;

use super::file::Proxy;
use crate::pipeline::JobError;

fn invalid(message: String) -> JobError {
    JobError::new("invalid_job", message, false)
}

/// Where a local path may be read from: the canonical path when it lies under one of the
/// allowed directories (symlinks resolved first, so a link cannot lead out of them).
pub fn allowed_local_path(path: &Path, allow: &[PathBuf]) -> Result<PathBuf, JobError> {
    if allow.is_empty() {
        return Err(invalid(format!(
            "{} is a path on the worker host, and this worker allows none (build.files_allow is empty); use an http(s) URL",
            path.display()
        )));
    }
    let canonical = path
        .canonicalize()
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    let inside = allow.iter().any(|dir| {
        dir.canonicalize()
            .is_ok_and(|dir| canonical.starts_with(&dir))
    });
    if !inside {
        return Err(invalid(format!(
            "{} is outside the directories this worker allows (build.files_allow)",
            path.display()
        )));
    }
    Ok(canonical)
}

/// Downloads `url` into memory, at most `max_bytes`.
pub async fn download(
    url: &str,
    proxy: &Proxy,
    timeout: Duration,
    max_bytes: u64,
) -> Result<Vec<u8>, JobError> {
    let shown = crate::secrets::mask_url_credentials(url);
    let parsed = url::Url::parse(url).map_err(|e| invalid(format!("{shown}: {e}")))?;
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::limited(5));
    if let Some(p) = proxy.for_scheme(parsed.scheme()) {
        let mut p = reqwest::Proxy::all(p).map_err(|e| invalid(format!("proxy: {e}")))?;
        if let Some(np) = proxy.no_proxy() {
            p = p.no_proxy(reqwest::NoProxy::from_string(np));
        }
        builder = builder.proxy(p);
    }
    let client = builder
        .build()
        .map_err(|e| JobError::new("internal", format!("http client: {e}"), false))?;
    let response = client.get(parsed).send().await.map_err(|e| {
        JobError::new(
            "fetch",
            format!(
                "downloading {shown}: {}",
                crate::secrets::mask_url_credentials(&e.to_string())
            ),
            true,
        )
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(JobError::new(
            if status.is_server_error() {
                "fetch"
            } else {
                "not_found"
            },
            format!("downloading {shown}: the server answered {status}"),
            status.is_server_error(),
        ));
    }
    if response.content_length().is_some_and(|n| n > max_bytes) {
        return Err(invalid(format!(
            "{shown} is larger than the limit of {max_bytes} bytes (build.max_file_bytes)"
        )));
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| JobError::new("fetch", format!("downloading {shown}: {e}"), true))?;
        body.extend_from_slice(&chunk);
        if body.len() as u64 > max_bytes {
            return Err(invalid(format!(
                "{shown} is larger than the limit of {max_bytes} bytes (build.max_file_bytes)"
            )));
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security: nothing outside the allow-list is read, symlinks and `..` included.
    #[test]
    fn local_paths_only_under_the_allow_list() {
        let root = std::env::temp_dir().join(format!("iw-allow-{}", uuid::Uuid::new_v4().simple()));
        let allowed = root.join("allowed");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::write(allowed.join("ok.txt"), b"ok").unwrap();
        std::fs::write(root.join("secret.txt"), b"no").unwrap();
        std::os::unix::fs::symlink(root.join("secret.txt"), allowed.join("link.txt")).unwrap();
        std::os::unix::fs::symlink("/etc", allowed.join("etc")).unwrap();
        let allow = vec![allowed.clone()];

        assert_eq!(
            allowed_local_path(&allowed.join("ok.txt"), &allow).unwrap(),
            allowed.canonicalize().unwrap().join("ok.txt")
        );
        for bad in [
            root.join("secret.txt"),
            allowed.join("link.txt"),
            allowed.join("etc/passwd"),
            allowed.join("../secret.txt"),
            PathBuf::from("/etc/passwd"),
        ] {
            let e = allowed_local_path(&bad, &allow).unwrap_err();
            assert_eq!(e.kind, "invalid_job");
            assert!(
                e.message.contains("outside the directories"),
                "{}: {e}",
                bad.display()
            );
        }
        let e = allowed_local_path(&allowed.join("ok.txt"), &[]).unwrap_err();
        assert!(e.message.contains("build.files_allow is empty"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
