//! Finding pyATS job files and manifests inside an image. (Placeholder API until the discovery
//! branch lands; replaced wholesale by it.)
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    #[default]
    Auto,
    Layers,
    Archive,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Layers => "layers",
            Self::Archive => "archive",
        })
    }
}
impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "layers" => Ok(Self::Layers),
            "archive" => Ok(Self::Archive),
            _ => Err(format!("unknown source {s}")),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct JobRules {
    pub r#match: Option<String>,
    pub glob: Vec<String>,
    pub paths: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    pub default_root: String,
    pub rules: JobRules,
    pub source: Source,
    pub max_manifest_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discovery {
    pub root: String,
    pub source: Source,
    pub jobs: Vec<String>,
    pub manifests: Vec<Manifest>,
    pub warnings: Vec<String>,
    pub files_scanned: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub file: String,
    pub job_file: String,
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub arguments: serde_json::Value,
    pub profiles: Vec<serde_json::Value>,
    pub runtimes: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("engine: {0}")]
    Engine(String),
}

pub async fn discover_image(
    _docker: &bollard::Docker,
    _image: &str,
    opts: &DiscoveryOptions,
) -> Result<Discovery, DiscoveryError> {
    Ok(Discovery {
        root: opts.default_root.clone(),
        source: Source::Archive,
        jobs: vec![],
        manifests: vec![],
        warnings: vec![],
        files_scanned: 0,
    })
}
