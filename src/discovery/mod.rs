//! Finding pyATS job files and manifests inside an image.
//!
//! `discover_image` reads the image's files from one of two sources and judges them with the
//! same rules (`rules`, `manifest`, `findings`), so both give identical reports:
//! - `layers` (`layers.rs`): the overlay layer directories on this host, walked in place;
//! - `archive` (`archive.rs`): the engine's tar archive of the workspace root, streamed.
//!
//! Invariants: nothing is read from the host through an image's symlink (links resolve inside
//! the image, `resolve.rs`); a broken manifest or an unreadable file is a warning, never an
//! error; skipped trees (`site-packages`, `__pycache__`, `.git`, `<root>/installation/`) are
//! never searched.

mod archive;
mod findings;
mod layers;
mod manifest;
mod resolve;
mod rules;

use std::fmt;
use std::str::FromStr;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use serde::{Deserialize, Serialize};

pub use manifest::{DEFAULT_PROFILE, Manifest, Profile, parse_manifest};
pub use rules::DEFAULT_JOB_MATCH;

use findings::Findings;
use layers::LayerView;
use rules::CompiledRules;

/// Where discovery reads an image's files from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `layers` when this host can read the image's layer directories, else `archive`.
    #[default]
    Auto,
    /// The engine's overlay layer directories, walked in place (fast; local engine only).
    Layers,
    /// The engine's archive of the workspace root (any storage driver, remote engines).
    Archive,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Layers => "layers",
            Self::Archive => "archive",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "layers" => Ok(Self::Layers),
            "archive" => Ok(Self::Archive),
            other => Err(format!(
                "unknown discovery source {other:?} (expected auto, layers or archive)"
            )),
        }
    }
}

/// Which `.py` files are jobs: the `jobfiles` section of a build file (pyats-image-builder).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct JobRules {
    /// Regex matched against the absolute path; `None` means `DEFAULT_JOB_MATCH`.
    pub r#match: Option<String>,
    /// Shell globs; relative ones are relative to the workspace root.
    #[serde(default)]
    pub glob: Vec<String>,
    /// Job files by path; relative ones are relative to the workspace root.
    #[serde(default)]
    pub paths: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    /// The root when the image sets no `WORKSPACE`.
    pub default_root: String,
    pub rules: JobRules,
    pub source: Source,
    /// Larger `.tem` files are reported as a warning without being read.
    pub max_manifest_bytes: u64,
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        Self {
            default_root: "/pyats".into(),
            rules: JobRules::default(),
            source: Source::Auto,
            max_manifest_bytes: 1 << 20,
        }
    }
}

/// What an image holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discovery {
    /// The workspace root searched.
    pub root: String,
    /// The source that ran: `Layers` or `Archive`.
    pub source: Source,
    /// Absolute paths of the job files, sorted.
    pub jobs: Vec<String>,
    /// Valid manifests, sorted by file.
    pub manifests: Vec<Manifest>,
    /// `<path>: <reason>` for what could not be used (broken manifests, dangling links), sorted.
    pub warnings: Vec<String>,
    /// Files looked at under the root, outside skipped trees.
    pub files_scanned: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("invalid job rules: {0}")]
    InvalidRules(String),
    #[error("the layers source is unavailable: {0}")]
    LayersUnavailable(String),
    #[error("docker engine request failed")]
    Engine(#[from] EngineError),
    #[error("reading the image failed")]
    Io(#[from] std::io::Error),
}

/// Finds the job files and manifests of a local image.
pub async fn discover_image(
    docker: &Docker,
    image: &str,
    opts: &DiscoveryOptions,
) -> Result<Discovery, DiscoveryError> {
    let inspect = match docker.inspect_image(image).await {
        Ok(inspect) => inspect,
        Err(EngineError::DockerResponseServerError {
            status_code: 404, ..
        }) => {
            return Err(DiscoveryError::ImageNotFound(image.to_owned()));
        }
        Err(e) => return Err(e.into()),
    };
    let env = inspect
        .config
        .as_ref()
        .and_then(|c| c.env.as_deref())
        .unwrap_or_default();
    let root = workspace_root(env, &opts.default_root);
    let findings = Findings::new(
        CompiledRules::new(&opts.rules, &root)?,
        opts.max_manifest_bytes,
    );
    let driver = inspect
        .graph_driver
        .as_ref()
        .map(|d| (d.name.as_str(), &d.data));
    match choose_source(opts.source, driver)? {
        Chosen::Layers(view) => {
            let findings = tokio::task::spawn_blocking(move || {
                let mut findings = findings;
                view.scan(&mut findings).map(|()| findings)
            })
            .await
            .map_err(std::io::Error::other)??;
            Ok(findings.finish(Source::Layers))
        }
        Chosen::Archive => Ok(archive::scan(docker, image, findings)
            .await?
            .finish(Source::Archive)),
    }
}

/// `WORKSPACE` from the image's environment (last one wins, as in a shell), else the default.
fn workspace_root(env: &[String], default_root: &str) -> String {
    let root = env
        .iter()
        .rev()
        .find_map(|kv| kv.strip_prefix("WORKSPACE="))
        .filter(|v| !v.trim().is_empty());
    let root = root.unwrap_or(default_root);
    if root.starts_with('/') {
        rules::normalize(root)
    } else {
        rules::normalize(&format!("/{root}"))
    }
}

#[derive(Debug)]
enum Chosen {
    Layers(LayerView),
    Archive,
}

fn choose_source(
    wanted: Source,
    driver: Option<(&str, &std::collections::HashMap<String, String>)>,
) -> Result<Chosen, DiscoveryError> {
    let layers = match driver {
        Some((name, data)) => LayerView::from_driver(name, data),
        None => Err("the engine reports no storage driver for the image".into()),
    };
    match (wanted, layers) {
        (Source::Archive, _) => Ok(Chosen::Archive),
        (_, Ok(view)) => Ok(Chosen::Layers(view)),
        (Source::Layers, Err(reason)) => Err(DiscoveryError::LayersUnavailable(reason)),
        (Source::Auto, Err(_)) => Ok(Chosen::Archive),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn source_names_round_trip() {
        for s in [Source::Auto, Source::Layers, Source::Archive] {
            assert_eq!(s.to_string().parse::<Source>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("overlay".parse::<Source>().is_err());
    }

    #[test]
    fn workspace_comes_from_the_image_env() {
        let env = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(workspace_root(&env(&["PATH=/bin"]), "/pyats"), "/pyats");
        assert_eq!(
            workspace_root(&env(&["WORKSPACE=/other/"]), "/pyats"),
            "/other"
        );
        assert_eq!(
            workspace_root(&env(&["WORKSPACE=/a", "WORKSPACE=/b"]), "/pyats"),
            "/b"
        );
        assert_eq!(workspace_root(&env(&["WORKSPACE="]), "/pyats"), "/pyats");
    }

    #[test]
    fn choosing_the_source() {
        let dir = std::env::temp_dir();
        let readable: HashMap<String, String> = [
            ("UpperDir".to_string(), dir.display().to_string()),
            (
                "LowerDir".into(),
                format!("{}:{}", dir.display(), dir.display()),
            ),
        ]
        .into();
        let unreadable: HashMap<String, String> =
            [("UpperDir".to_string(), "/nonexistent/diff".to_string())].into();
        let no_upper: HashMap<String, String> = HashMap::new();

        assert!(matches!(
            choose_source(Source::Auto, Some(("overlay2", &readable))),
            Ok(Chosen::Layers(_))
        ));
        assert!(matches!(
            choose_source(Source::Layers, Some(("fuse-overlayfs", &readable))),
            Ok(Chosen::Layers(_))
        ));
        assert!(matches!(
            choose_source(Source::Archive, Some(("overlay2", &readable))),
            Ok(Chosen::Archive)
        ));
        for (name, data) in [
            ("btrfs", &readable),
            ("overlay2", &unreadable),
            ("overlay2", &no_upper),
        ] {
            assert!(matches!(
                choose_source(Source::Auto, Some((name, data))),
                Ok(Chosen::Archive)
            ));
            let err = choose_source(Source::Layers, Some((name, data))).unwrap_err();
            assert!(matches!(err, DiscoveryError::LayersUnavailable(_)), "{err}");
        }
        let err = choose_source(Source::Layers, None).unwrap_err().to_string();
        assert!(err.contains("no storage driver"), "{err}");
        let err = choose_source(Source::Layers, Some(("overlay2", &unreadable)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/diff"), "{err}");
    }
}
