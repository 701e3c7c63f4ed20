//! The Docker engine: connecting (with API version negotiation), pulling, pushing, tagging,
//! inspecting, and turning the engine's errors into kinds a report can carry.

use std::collections::HashMap;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::models::ImageInspect;
use bollard::query_parameters::{
    BuildImageOptions, CreateImageOptionsBuilder, PushImageOptionsBuilder, TagImageOptionsBuilder,
};
use futures_util::StreamExt;

use crate::report::Progress;

/// What went wrong, in the terms of the report's `error.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineErrorKind {
    /// The registry refused the credentials (or asked for some).
    Auth,
    /// The image, tag or digest does not exist.
    NotFound,
    /// The registry could not be reached.
    RegistryUnreachable,
    /// The registry answered with a server error.
    RegistryError,
    /// The Docker engine could not be reached.
    EngineUnavailable,
    /// Anything else the engine said.
    Engine,
}

impl EngineErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::NotFound => "not_found",
            Self::RegistryUnreachable => "registry_unreachable",
            Self::RegistryError => "registry_error",
            Self::EngineUnavailable => "engine_unavailable",
            Self::Engine => "engine",
        }
    }

    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::RegistryUnreachable | Self::RegistryError | Self::EngineUnavailable
        )
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    pub kind: EngineErrorKind,
    pub message: String,
}

impl EngineError {
    fn new(kind: EngineErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<bollard::errors::Error> for EngineError {
    fn from(e: bollard::errors::Error) -> Self {
        use bollard::errors::Error as B;
        let message = match &e {
            B::DockerResponseServerError { message, .. } => message.clone(),
            B::DockerStreamError { error } => error.clone(),
            other => other.to_string(),
        };
        let kind = match &e {
            B::DockerResponseServerError { status_code, .. } if *status_code == 404 => {
                classify_message(&message).unwrap_or(EngineErrorKind::NotFound)
            }
            B::DockerResponseServerError { .. } | B::DockerStreamError { .. } => {
                classify_message(&message).unwrap_or(EngineErrorKind::Engine)
            }
            B::IOError { .. }
            | B::HyperResponseError { .. }
            | B::HyperLegacyError { .. }
            | B::RequestTimeoutError
            | B::SocketNotFoundError(_) => EngineErrorKind::EngineUnavailable,
            _ => classify_message(&message).unwrap_or(EngineErrorKind::Engine),
        };
        EngineError::new(kind, crate::secrets::mask_url_credentials(&message))
    }
}

/// Reads the kind out of an engine or registry message.
pub fn classify_message(message: &str) -> Option<EngineErrorKind> {
    let m = message.to_ascii_lowercase();
    let any = |needles: &[&str]| needles.iter().any(|n| m.contains(n));
    if any(&[
        "unauthorized",
        "no basic auth credentials",
        "authentication required",
        "incorrect username or password",
        "access denied",
        "denied: ",
    ]) {
        Some(EngineErrorKind::Auth)
    } else if any(&[
        "manifest unknown",
        "not found",
        "repository does not exist",
        "no such image",
        "name unknown",
        "no matching manifest",
    ]) {
        Some(EngineErrorKind::NotFound)
    } else if any(&[
        "connection refused",
        "no such host",
        "i/o timeout",
        "connection reset",
        "broken pipe",
        "network is unreachable",
        "tls handshake timeout",
        "dial tcp",
        "eof",
    ]) {
        Some(EngineErrorKind::RegistryUnreachable)
    } else if any(&[
        "500 internal server error",
        "502 bad gateway",
        "503 service unavailable",
        "504 gateway",
        "unexpected http status: 5",
        "received unexpected http status",
        "toomanyrequests",
        "429",
    ]) {
        Some(EngineErrorKind::RegistryError)
    } else {
        None
    }
}

/// A client for the engine named by `host`, not yet checked: the first request says whether
/// the engine is there.
pub fn client(host: Option<&str>) -> Result<Docker, EngineError> {
    match host {
        Some(h) if h.starts_with("unix://") || h.starts_with('/') => {
            Docker::connect_with_unix(h, 120, bollard::API_DEFAULT_VERSION)
        }
        Some(h) => Docker::connect_with_http(h, 120, bollard::API_DEFAULT_VERSION),
        None => Docker::connect_with_local_defaults(),
    }
    .map_err(|e| {
        EngineError::new(
            EngineErrorKind::EngineUnavailable,
            format!("cannot connect to the Docker engine: {e}"),
        )
    })
}

/// Connects to the engine named by `host` (or `DOCKER_HOST`, or the local socket) and negotiates
/// the API version with it: the engine may be older than the client's default.
pub async fn connect(host: Option<&str>) -> Result<Docker, EngineError> {
    let docker = client(host)?;
    docker.negotiate_version().await.map_err(|e| {
        EngineError::new(
            EngineErrorKind::EngineUnavailable,
            format!("the Docker engine does not answer: {e}"),
        )
    })
}

/// Registry credentials for the engine's `X-Registry-Auth`.
pub fn credentials(
    registry: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Option<DockerCredentials> {
    username.map(|u| DockerCredentials {
        username: Some(u.to_string()),
        password: password.map(str::to_string),
        serveraddress: Some(registry.to_string()),
        ..Default::default()
    })
}

/// Sums byte progress over layers from the engine's pull/push status stream.
#[derive(Debug, Default)]
pub struct LayerProgress {
    layers: HashMap<String, (u64, Option<u64>)>,
}

impl LayerProgress {
    /// Takes one status message; returns whether it changed the byte counts.
    pub fn update(
        &mut self,
        id: Option<&str>,
        status: &str,
        current: Option<i64>,
        total: Option<i64>,
    ) -> bool {
        let Some(id) = id.filter(|id| !id.is_empty()) else {
            return false;
        };
        let entry = self.layers.entry(id.to_string()).or_insert((0, None));
        let before = *entry;
        match status {
            "Downloading" | "Pushing" => {
                if let Some(c) = current {
                    entry.0 = c.max(0) as u64;
                }
                if let Some(t) = total.filter(|t| *t > 0) {
                    entry.1 = Some(t as u64);
                }
            }
            "Download complete"
            | "Pull complete"
            | "Pushed"
            | "Layer already exists"
            | "Already exists"
            | "Mounted from" => {
                if let Some(t) = entry.1 {
                    entry.0 = t;
                }
            }
            _ => {}
        }
        *entry != before
    }

    pub fn progress(&self) -> Progress {
        let current = self.layers.values().map(|(c, _)| c).sum();
        let known: Vec<u64> = self.layers.values().filter_map(|(_, t)| *t).collect();
        Progress {
            current,
            total: (!known.is_empty()).then(|| known.iter().sum()),
        }
    }
}

/// A status line worth a line in the job log: layer state changes, not every byte tick.
fn loggable(status: &str) -> bool {
    !matches!(
        status,
        "Downloading" | "Extracting" | "Pushing" | "Waiting" | "Verifying Checksum"
    )
}

/// Pulls `repository` at `tag_or_digest` (a tag, or `sha256:...`).
pub async fn pull_image(
    docker: &Docker,
    repository: &str,
    tag_or_digest: &str,
    platform: Option<&str>,
    creds: Option<DockerCredentials>,
    mut on_progress: impl FnMut(Progress),
    mut on_line: impl FnMut(String),
) -> Result<Progress, EngineError> {
    let options = CreateImageOptionsBuilder::default()
        .from_image(repository)
        .tag(tag_or_digest)
        .platform(platform.unwrap_or(""))
        .build();
    let mut stream = docker.create_image(Some(options), None, creds);
    let mut progress = LayerProgress::default();
    while let Some(item) = stream.next().await {
        let info = item?;
        let status = info.status.unwrap_or_default();
        let (current, total) = info
            .progress_detail
            .map(|p| (p.current, p.total))
            .unwrap_or((None, None));
        if progress.update(info.id.as_deref(), &status, current, total) {
            on_progress(progress.progress());
        }
        if loggable(&status) {
            match info.id {
                Some(id) if !id.is_empty() => on_line(format!("{id}: {status}")),
                _ => on_line(status),
            }
        }
    }
    Ok(progress.progress())
}

/// Pushes `repository:tag`; returns the registry digest the engine reports and the bytes sent.
pub async fn push_image(
    docker: &Docker,
    repository: &str,
    tag: &str,
    creds: Option<DockerCredentials>,
    mut on_progress: impl FnMut(Progress),
    mut on_line: impl FnMut(String),
) -> Result<(Option<String>, Progress), EngineError> {
    let options = PushImageOptionsBuilder::default().tag(tag).build();
    let mut stream = docker.push_image(repository, Some(options), creds);
    let mut progress = LayerProgress::default();
    let mut digest = None;
    while let Some(item) = stream.next().await {
        let info = item?;
        let status = info.status.unwrap_or_default();
        let (current, total) = info
            .progress_detail
            .map(|p| (p.current, p.total))
            .unwrap_or((None, None));
        if progress.update(Some("push"), &status, current, total) {
            on_progress(progress.progress());
        }
        // The last line reads "<tag>: digest: sha256:... size: N".
        if let Some(rest) = status.split("digest: ").nth(1) {
            digest = rest.split_whitespace().next().map(str::to_string);
        }
        if loggable(&status) && !status.is_empty() {
            on_line(status);
        }
    }
    Ok((digest, progress.progress()))
}

/// What a build said: the image id, or why it failed.
#[derive(Debug)]
pub enum BuildOutcome {
    Built {
        image_id: Option<String>,
    },
    /// A build step failed (the engine's message); the output told why.
    Failed {
        message: String,
    },
}

/// Builds an image from an in-memory context (a tar) with the legacy builder. Every line of
/// build output goes to `on_line` as it comes. Registry credentials are for `FROM` pulls.
pub async fn build_image(
    docker: &Docker,
    options: BuildImageOptions,
    registry_credentials: HashMap<String, DockerCredentials>,
    context: Vec<u8>,
    mut on_line: impl FnMut(String),
) -> Result<BuildOutcome, EngineError> {
    let creds = (!registry_credentials.is_empty()).then_some(registry_credentials);
    let mut stream = docker.build_image(
        options,
        creds,
        Some(bollard::body_full(bytes::Bytes::from(context))),
    );
    let mut partial = String::new();
    let mut image_id = None;
    while let Some(item) = stream.next().await {
        let info = match item {
            Ok(info) => info,
            Err(bollard::errors::Error::DockerStreamError { error }) => {
                if !partial.is_empty() {
                    on_line(std::mem::take(&mut partial));
                }
                return Ok(BuildOutcome::Failed {
                    message: crate::secrets::mask_url_credentials(error.trim()),
                });
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(text) = info.stream {
            partial.push_str(&text);
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                let line = line.trim_end();
                if !line.is_empty() {
                    on_line(line.to_string());
                }
            }
        }
        if let Some(status) = info.status.filter(|s| loggable(s) && !s.is_empty()) {
            match info.id.filter(|id| !id.is_empty()) {
                Some(id) => on_line(format!("{id}: {status}")),
                None => on_line(status),
            }
        }
        if let Some(id) = info.aux.and_then(|aux| aux.id) {
            image_id = Some(id);
        }
    }
    if !partial.trim().is_empty() {
        on_line(partial.trim_end().to_string());
    }
    Ok(BuildOutcome::Built { image_id })
}

/// Tags `source` as `repository:tag`.
pub async fn tag_image(
    docker: &Docker,
    source: &str,
    repository: &str,
    tag: &str,
) -> Result<(), EngineError> {
    let options = TagImageOptionsBuilder::default()
        .repo(repository)
        .tag(tag)
        .build();
    docker.tag_image(source, Some(options)).await?;
    Ok(())
}

/// Inspects a local image; `Ok(None)` when the engine does not have it.
pub async fn inspect_image(
    docker: &Docker,
    reference: &str,
) -> Result<Option<ImageInspect>, EngineError> {
    match docker.inspect_image(reference).await {
        Ok(i) => Ok(Some(i)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The registry digest of `repository` among the image's `RepoDigests`.
pub fn repo_digest(inspect: &ImageInspect, repository: &str) -> Option<String> {
    inspect.repo_digests.as_ref()?.iter().find_map(|d| {
        let (repo, digest) = d.split_once('@')?;
        (repo == repository).then(|| digest.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_registry_messages() {
        use EngineErrorKind::*;
        let cases = [
            (
                "Head \"http://127.0.0.1:5001/v2/x/manifests/1\": no basic auth credentials",
                Auth,
            ),
            ("unauthorized: authentication required", Auth),
            (
                "manifest for 127.0.0.1:5000/nope:1 not found: manifest unknown",
                NotFound,
            ),
            (
                "Get \"http://127.0.0.1:5999/v2/\": dial tcp 127.0.0.1:5999: connect: connection refused",
                RegistryUnreachable,
            ),
            (
                "received unexpected HTTP status: 500 Internal Server Error",
                RegistryError,
            ),
            ("toomanyrequests: slow down", RegistryError),
        ];
        for (msg, kind) in cases {
            assert_eq!(classify_message(msg), Some(kind), "{msg}");
        }
        assert_eq!(classify_message("something odd"), None);
        assert!(RegistryError.retryable() && !Auth.retryable() && !NotFound.retryable());
    }

    #[test]
    fn layer_progress_sums_layers() {
        let mut p = LayerProgress::default();
        assert!(p.update(Some("a"), "Downloading", Some(10), Some(100)));
        assert!(p.update(Some("b"), "Downloading", Some(5), Some(50)));
        assert_eq!(
            p.progress(),
            Progress {
                current: 15,
                total: Some(150)
            }
        );
        assert!(p.update(Some("a"), "Pull complete", None, None));
        assert_eq!(p.progress().current, 105);
        assert!(!p.update(None, "Digest: sha256:x", None, None));
    }
}
