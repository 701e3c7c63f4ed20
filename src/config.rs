//! The worker's configuration: one YAML file, every key overridable from the environment.
//!
//! Environment overrides use `IMAGE_WORKER__<SECTION>__<KEY>` (double underscores separate the
//! levels), e.g. `IMAGE_WORKER__AMQP__URL` or `IMAGE_WORKER__WORKER__CONCURRENCY=4`. Values are
//! parsed as YAML scalars or flow sequences (`[a, b]`). Secrets (the AMQP URL's password, registry
//! passwords) come from the environment or from `*_file` keys, never only from the command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::discovery::{JobRules, Source};

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "IMAGE_WORKER__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the {what} {path}: {source}")]
    SecretFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("invalid environment override {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Who this worker is and what it takes.
    pub worker: WorkerConfig,
    /// The RabbitMQ connection and topology names.
    pub amqp: AmqpConfig,
    /// The Docker engine.
    pub docker: DockerConfig,
    /// Default registry credentials and the optional mirror.
    pub registry: RegistryConfig,
    /// How pyATS jobs and manifests are found inside an image.
    pub discovery: DiscoveryConfig,
    /// Where each job's log and report are written.
    pub logs: LogsConfig,
    /// Limits that apply to every job.
    pub jobs: JobsConfig,
    /// `build` jobs: the base image, what a build file may read, limits.
    pub build: BuildConfig,
    /// `polaris_build` jobs: the repository they build and where images go.
    pub polaris: PolarisConfig,
    /// The operations endpoint: /healthz, /readyz, /metrics.
    pub http: HttpConfig,
    /// The budget of images this worker keeps on the engine.
    pub cache: CacheConfig,
}

/// The images this worker pulled or built stay on the engine (for `pin_version` jobs) within
/// this budget; past it, the least recently used go first, never one a running job uses, never
/// an image the worker did not bring.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Most bytes of such images kept; 0 means no limit.
    pub max_bytes: u64,
    /// Least free bytes kept on the engine's filesystem (its DockerRootDir); 0 means no check.
    pub min_free_bytes: u64,
}

/// The operations endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on (loopback by default; port 0 picks a free one); empty disables it.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// Worker identity, as reported in every record's `worker` block.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Label of this worker; defaults to the host name (the pod name in Kubernetes).
    pub app_label: Option<String>,
    /// Stable id of this worker; a new UUID at each start when unset.
    pub worker_id: Option<String>,
    /// Site code, e.g. `SJC`.
    pub site: String,
    /// Building code, e.g. `SJC-2`.
    pub bldg: String,
    /// The pool this worker serves first; jobs are routed with `<cap>.<pool>`.
    pub group: String,
    /// Further pools this worker also consumes.
    pub interest_list: Vec<String>,
    /// Capabilities advertised; the worker consumes the ones it implements (`image`).
    pub caps: Vec<String>,
    /// Service name reported in the `worker` block.
    pub service_name: String,
    /// Service URL reported in the `worker` block.
    pub service_url: String,
    /// Jobs run at once; also the AMQP prefetch.
    pub concurrency: u16,
    /// Seconds between `worker.heartbeat` events.
    pub heartbeat_interval_s: u64,
    /// Seconds running jobs get to finish after SIGTERM before they are returned to the queue.
    pub shutdown_grace_s: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            app_label: None,
            worker_id: None,
            site: String::new(),
            bldg: String::new(),
            group: "general".into(),
            interest_list: Vec::new(),
            caps: vec!["image".into(), "polaris_image".into(), "pyats".into()],
            service_name: "image-worker".into(),
            service_url: String::new(),
            concurrency: 2,
            heartbeat_interval_s: 30,
            shutdown_grace_s: 60,
        }
    }
}

/// RabbitMQ.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// AMQP URL, credentials included; prefer setting it from `IMAGE_WORKER__AMQP__URL`.
    pub url: String,
    /// File holding the AMQP URL (e.g. a mounted Kubernetes secret); wins over `url`.
    pub url_file: Option<PathBuf>,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            url_file: None,
            prefix: "xpresso".into(),
        }
    }
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &crate::secrets::mask_url_credentials(&self.url))
            .field("url_file", &self.url_file)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// The Docker engine.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Engine address (`unix:///var/run/docker.sock`, `tcp://host:2375`); unset means
    /// `DOCKER_HOST` or the local socket. The API version is negotiated with the engine.
    pub host: Option<String>,
    /// Seconds between checks that the engine answers; while it does not, no job is taken.
    pub ping_interval_s: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            host: None,
            ping_interval_s: 5,
        }
    }
}

/// Registry credentials and the mirror.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Credentials used when a job brings none, by registry host (`host[:port]`).
    pub credentials: BTreeMap<String, Credentials>,
    /// When set, every pulled image is pushed to `<mirror>/<group>/<name>:<tag>` and that
    /// namespace is reported as `push_url`.
    pub mirror: Option<String>,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("credentials", &self.credentials.keys().collect::<Vec<_>>())
            .field("mirror", &self.mirror)
            .finish()
    }
}

/// One registry's credentials.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password; prefer `password_file` or the environment.
    pub password: Option<String>,
    /// File holding the password (trailing newline ignored); wins over `password`.
    pub password_file: Option<PathBuf>,
}

impl Credentials {
    /// The password, read from `password_file` when set.
    pub fn resolve_password(&self) -> Result<Option<String>, ConfigError> {
        match &self.password_file {
            Some(path) => read_secret_file("password file", path).map(Some),
            None => Ok(self.password.clone()),
        }
    }
}

/// Discovery defaults (a build's `jobfiles:` section adds to these).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Workspace root when the image sets no `WORKSPACE` variable.
    pub root: String,
    /// Regex a job file's absolute path must match (or a glob, a listed path, the marker).
    pub r#match: Option<String>,
    /// Globs that also select job files.
    pub glob: Vec<String>,
    /// Absolute paths that are job files when they exist and define `main`.
    pub paths: Vec<String>,
    /// Where the image's files are read from: `auto`, `layers` or `archive`.
    pub source: Source,
    /// Manifests larger than this are reported as warnings, never read.
    pub max_manifest_bytes: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            root: "/pyats".into(),
            r#match: None,
            glob: Vec::new(),
            paths: Vec::new(),
            source: Source::Auto,
            max_manifest_bytes: 1024 * 1024,
        }
    }
}

impl DiscoveryConfig {
    pub fn options(&self) -> crate::discovery::DiscoveryOptions {
        crate::discovery::DiscoveryOptions {
            default_root: self.root.clone(),
            rules: JobRules {
                r#match: self.r#match.clone(),
                glob: self.glob.clone(),
                paths: self.paths.clone(),
            },
            source: self.source,
            max_manifest_bytes: self.max_manifest_bytes,
        }
    }
}

/// Job logs and reports.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// Root of the job logs: each job writes `<root>/<YYYY>/<MM>/images/<uuid>/`.
    pub root: PathBuf,
    /// Lines of the job log carried in the report's `logs` (at most 64 KiB of them, each line
    /// cut at 8 KiB: the report is one AMQP message).
    pub tail_lines: usize,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/image-worker/logs"),
            tail_lines: 40,
        }
    }
}

/// Limits of every job.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Seconds a job may run when it names no `timeout_s`.
    pub default_timeout_s: u64,
    /// Largest job message accepted, in bytes; larger ones are dead-lettered.
    pub max_message_bytes: usize,
    /// Further tries of a registry operation that failed transiently (unreachable, 5xx, 429).
    pub registry_retries: u32,
    /// First wait between tries, in milliseconds; doubles each try (capped at 30 s), with jitter.
    pub retry_backoff_ms: u64,
    /// A job still running after this many seconds hands its message over to a lease (see
    /// ARCHITECTURE.md), so RabbitMQ's consumer_timeout (30 min by default) never closes the
    /// channel under it. Keep it below the broker's consumer_timeout.
    pub lease_after_s: u64,
    /// Seconds a lease lives without renewal; a worker that dies lets it expire and the job goes
    /// back to its queue. Renewed every third of it.
    pub lease_s: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            default_timeout_s: 3600,
            max_message_bytes: 1024 * 1024,
            registry_retries: 4,
            retry_backoff_ms: 1000,
            lease_after_s: 1200,
            lease_s: 300,
        }
    }
}

/// `build` jobs (custom pyATS images from a build file).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuildConfig {
    /// Base image of every build; `{python}` is replaced by the build file's `python` version.
    pub base_image_template: String,
    /// Python version when the build file names none.
    pub default_python: String,
    /// Directories of this host that `files` entries (plain paths) and `file://` repositories
    /// may read from. Empty: nothing on this host can enter an image.
    pub files_allow: Vec<PathBuf>,
    /// Largest build file (`yaml_content`) accepted, in bytes.
    pub max_yaml_bytes: usize,
    /// Largest single `files` download, in bytes.
    pub max_file_bytes: u64,
    /// Largest build context (all files, repositories and generated files), in bytes.
    pub max_context_bytes: u64,
    /// Seconds a `files` download may take.
    pub fetch_timeout_s: u64,
    /// Lines of build output quoted in the report's `error.message` when a build fails (the
    /// message is cut at 16 KiB, keeping its head and its end).
    pub error_tail_lines: usize,
}

impl Default for BuildConfig {
    fn default() -> Self {
        Self {
            base_image_template: "python:{python}-slim".into(),
            default_python: "3.11".into(),
            files_allow: Vec::new(),
            max_yaml_bytes: 256 * 1024,
            max_file_bytes: 256 * 1024 * 1024,
            max_context_bytes: 1024 * 1024 * 1024,
            fetch_timeout_s: 300,
            error_tail_lines: 20,
        }
    }
}

/// `polaris_build` jobs (images built from one configured git repository).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolarisConfig {
    /// Git URL of the repository (any URL git can fetch); unset: polaris_build jobs fail.
    pub repository: Option<String>,
    /// Path of the Dockerfile inside the repository.
    pub dockerfile: String,
    /// Registry and namespace images go to when a job names no `push_url`: the image is
    /// pushed to `<push_url>/<group>/<name>:<tag>`.
    pub push_url: Option<String>,
    /// Where the repository's cached mirror clone is kept between jobs.
    pub state_dir: PathBuf,
}

impl Default for PolarisConfig {
    fn default() -> Self {
        Self {
            repository: None,
            dockerfile: "Dockerfile".into(),
            push_url: None,
            state_dir: PathBuf::from("/var/lib/image-worker/polaris"),
        }
    }
}

impl Config {
    /// Loads `path` (or the defaults when `None`), then applies the environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let config = Self::from_yaml_and_env(&text, std::env::vars())?;
        config.check_secrets()?;
        Ok(config)
    }

    /// Parses YAML text and applies `IMAGE_WORKER__*` overrides from `env`.
    pub fn from_yaml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value: serde_yaml::Value = if text.trim().is_empty() {
            serde_yaml::Value::Mapping(Default::default())
        } else {
            serde_yaml::from_str(text)?
        };
        if value.is_null() {
            value = serde_yaml::Value::Mapping(Default::default());
        }
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        overrides.sort();
        for (var, raw) in &overrides {
            apply_override(&mut value, var, raw)?;
        }
        let applied: Vec<String> = overrides.iter().map(|(k, _)| k.clone()).collect();
        let config: Config = serde_yaml::from_value(value).map_err(|e| {
            if applied.is_empty() {
                ConfigError::Parse(e)
            } else {
                // The error cannot say whether a file key or a variable was wrong: name both.
                ConfigError::Invalid(format!(
                    "{e} (environment overrides applied: {})",
                    applied.join(", ")
                ))
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.worker.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "worker.concurrency must be at least 1".into(),
            ));
        }
        if self.worker.group.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "worker.group must not be empty".into(),
            ));
        }
        for pool in std::iter::once(&self.worker.group).chain(&self.worker.interest_list) {
            check_pool_name(pool).map_err(ConfigError::Invalid)?;
        }
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.worker.heartbeat_interval_s == 0 {
            return invalid("worker.heartbeat_interval_s must be at least 1".into());
        }
        if let Some(id) = &self.worker.worker_id
            && uuid::Uuid::parse_str(id).is_err()
        {
            return invalid(format!("worker.worker_id {id:?} is not a UUID"));
        }
        if !self
            .worker
            .caps
            .iter()
            .any(|c| crate::daemon::IMPLEMENTED_CAPS.contains(&c.as_str()))
        {
            return invalid(format!(
                "worker.caps {:?} holds none of the caps this worker implements ({:?})",
                self.worker.caps,
                crate::daemon::IMPLEMENTED_CAPS
            ));
        }
        if !self.logs.root.is_absolute() {
            return invalid(format!(
                "logs.root {} must be an absolute path",
                self.logs.root.display()
            ));
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return invalid(format!(
                "http.listen {:?} is not an address such as 127.0.0.1:9464",
                self.http.listen
            ));
        }
        if self.amqp.url_file.is_none() {
            check_amqp_scheme(&self.amqp.url)?;
        }
        if self.jobs.lease_s < 3 {
            return Err(ConfigError::Invalid(
                "jobs.lease_s must be at least 3".into(),
            ));
        }
        if self.amqp.prefix.is_empty() {
            return Err(ConfigError::Invalid("amqp.prefix must not be empty".into()));
        }
        if let Some(m) = &self.discovery.r#match {
            regex::Regex::new(m)
                .map_err(|e| ConfigError::Invalid(format!("discovery.match: {e}")))?;
        }
        if !self.build.base_image_template.contains("{python}")
            || self
                .build
                .base_image_template
                .chars()
                .any(char::is_whitespace)
        {
            return Err(ConfigError::Invalid(
                "build.base_image_template must contain {python} and no whitespace".into(),
            ));
        }
        if let Some(dir) = self.build.files_allow.iter().find(|d| !d.is_absolute()) {
            return Err(ConfigError::Invalid(format!(
                "build.files_allow: {} is not an absolute path",
                dir.display()
            )));
        }
        if let Some(push_url) = &self.polaris.push_url {
            crate::reference::validate_push_url(push_url)
                .map_err(|e| ConfigError::Invalid(format!("polaris.push_url: {e}")))?;
        }
        if let Some(mirror) = &self.registry.mirror {
            crate::reference::validate_push_url(mirror)
                .map_err(|e| ConfigError::Invalid(format!("registry.mirror: {e}")))?;
        }
        Ok(())
    }

    /// What only the host can tell: the secret files named exist and hold usable values. `load`
    /// runs it (the commands run where the files are); a config checked elsewhere (a manifest
    /// in a test) skips it.
    pub fn check_secrets(&self) -> Result<(), ConfigError> {
        check_amqp_scheme(&self.amqp_url()?)?;
        for (host, creds) in &self.registry.credentials {
            creds
                .resolve_password()
                .map_err(|e| ConfigError::Invalid(format!("registry.credentials.{host}: {e}")))?;
        }
        Ok(())
    }

    /// What `run`, `job` and `config check` need of the host besides the secrets: `logs.root`
    /// can be created and written. Without it every job would report a `logs_dir` that holds
    /// nothing, so the worker refuses to start instead. Not part of `load`: `submit` and
    /// `cancel` run on other hosts, where the worker's logs root means nothing.
    pub fn check_logs_root(&self) -> Result<(), ConfigError> {
        let root = &self.logs.root;
        let unwritable = |e: std::io::Error| {
            ConfigError::Invalid(format!(
                "logs.root {} cannot be written: {e}",
                root.display()
            ))
        };
        std::fs::create_dir_all(root).map_err(unwritable)?;
        let probe = root.join(format!(".image-worker-write-check-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(unwritable)?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    /// The AMQP URL, read from `amqp.url_file` when set.
    pub fn amqp_url(&self) -> Result<String, ConfigError> {
        match &self.amqp.url_file {
            Some(path) => read_secret_file("amqp.url_file", path),
            None => Ok(self.amqp.url.clone()),
        }
    }
}

/// A pool name becomes part of a routing key and a queue name (`<prefix>.jobs.<cap>.<pool>`):
/// letters, digits, `-`, `_` and `.` only. Shared by `worker.group`, `worker.interest_list` and
/// `submit --pool`.
pub fn check_pool_name(pool: &str) -> Result<(), String> {
    if pool.is_empty() {
        return Err("a pool name must not be empty".into());
    }
    if !pool
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "pool name {pool:?} may hold only letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

fn check_amqp_scheme(url: &str) -> Result<(), ConfigError> {
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "the AMQP URL {} must start with amqp:// or amqps://",
            crate::secrets::mask_url_credentials(url)
        )))
    }
}

fn read_secret_file(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|source| ConfigError::SecretFile {
            what,
            path: path.to_path_buf(),
            source,
        })
}

fn apply_override(root: &mut serde_yaml::Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::Env {
        var: var.to_string(),
        reason,
    };
    let keys: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(|k| k.to_ascii_lowercase())
        .collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(err("empty key segment".into()));
    }
    // A value like "4", "true" or "[a, b]" becomes a number, bool or list; URLs stay strings.
    let parsed: serde_yaml::Value = match serde_yaml::from_str::<serde_yaml::Value>(raw) {
        Ok(
            v @ (serde_yaml::Value::Bool(_)
            | serde_yaml::Value::Number(_)
            | serde_yaml::Value::Sequence(_)),
        ) => v,
        _ => serde_yaml::Value::String(raw.to_string()),
    };
    let mut node = root;
    for (i, key) in keys.iter().enumerate() {
        let map = match node {
            serde_yaml::Value::Mapping(m) => m,
            _ => return Err(err(format!("{} is not a section", keys[..i].join(".")))),
        };
        let k = serde_yaml::Value::String(key.clone());
        if i + 1 == keys.len() {
            map.insert(k, parsed);
            return Ok(());
        }
        node = map
            .entry(k)
            .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
        if node.is_null() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_sane() {
        let c = Config::from_yaml_and_env("", env(&[])).unwrap();
        assert_eq!(c.worker.group, "general");
        assert_eq!(c.amqp.prefix, "xpresso");
        assert_eq!(c.worker.concurrency, 2);
        assert_eq!(c.discovery.root, "/pyats");
        assert_eq!(c.discovery.source, Source::Auto);
    }

    #[test]
    fn shipped_example_is_valid_and_matches_the_defaults() {
        let shipped = include_str!("../config/image-worker.yaml");
        let c = Config::from_yaml_and_env(shipped, env(&[])).unwrap();
        let d = Config::default();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::to_value(&d).unwrap()
        );
    }

    #[test]
    fn environment_overrides_file() {
        let yaml = "worker:\n  group: lab\n  concurrency: 3\n";
        let c = Config::from_yaml_and_env(
            yaml,
            env(&[
                ("IMAGE_WORKER__WORKER__CONCURRENCY", "8"),
                ("IMAGE_WORKER__WORKER__INTEREST_LIST", "[a, b]"),
                ("IMAGE_WORKER__AMQP__URL", "amqp://u:p@h:5672/%2f"),
                (
                    "IMAGE_WORKER__REGISTRY__CREDENTIALS__REG.EXAMPLE:5000__USERNAME",
                    "bob",
                ),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.worker.group, "lab");
        assert_eq!(c.worker.concurrency, 8);
        assert_eq!(c.worker.interest_list, vec!["a", "b"]);
        assert_eq!(c.amqp.url, "amqp://u:p@h:5672/%2f");
        assert_eq!(c.registry.credentials["reg.example:5000"].username, "bob");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = Config::from_yaml_and_env("worker:\n  grup: x\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("grup"), "{e}");
        let e = Config::from_yaml_and_env("", env(&[("IMAGE_WORKER__NOPE", "1")])).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Config::from_yaml_and_env("worker: {concurrency: 0}", env(&[])).is_err());
        assert!(Config::from_yaml_and_env("worker: {group: 'a b'}", env(&[])).is_err());
        assert!(Config::from_yaml_and_env("discovery: {match: '('}", env(&[])).is_err());
        assert!(Config::from_yaml_and_env("registry: {mirror: 'Bad Host'}", env(&[])).is_err());
    }

    #[test]
    fn unusable_settings_are_refused_before_the_daemon_starts() {
        let refused = |yaml: &str, want: &str| {
            let e = Config::from_yaml_and_env(yaml, env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{yaml}: {e}");
        };
        refused("amqp: {url: 'http://x'}", "amqp://");
        // Secret files are checked where the worker runs (`load`), not in the file's syntax.
        let secrets_refused = |yaml: &str, want: &str| {
            let c = Config::from_yaml_and_env(yaml, env(&[])).unwrap();
            let e = c.check_secrets().unwrap_err().to_string();
            assert!(e.contains(want), "{yaml}: {e}");
        };
        secrets_refused(
            "amqp: {url_file: /nonexistent/amqp-url}",
            "/nonexistent/amqp-url",
        );
        refused("http: {listen: nonsense}", "http.listen");
        refused("worker: {caps: [pyats]}", "none of the caps");
        refused("worker: {heartbeat_interval_s: 0}", "heartbeat_interval_s");
        refused("worker: {worker_id: not-a-uuid}", "worker_id");
        refused("logs: {root: relative/logs}", "absolute");
        secrets_refused(
            "registry: {credentials: {r: {username: u, password_file: /nonexistent/pw}}}",
            "registry.credentials.r: cannot read the password file /nonexistent/pw:",
        );
        secrets_refused(
            "amqp: {url_file: /nonexistent/amqp-url}",
            "cannot read the amqp.url_file /nonexistent/amqp-url:",
        );
        refused("worker: {interest_list: [ok, 'a b']}", "pool name \"a b\"");
        refused("worker: {interest_list: ['']}", "must not be empty");
        let e = Config::from_yaml_and_env("", env(&[("IMAGE_WORKER__WORKER__CONCURRENCY", "abc")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("IMAGE_WORKER__WORKER__CONCURRENCY"), "{e}");
    }

    #[test]
    fn pool_names_are_checked_once_for_config_and_submit() {
        assert_eq!(check_pool_name("lab-2.x_y"), Ok(()));
        assert_eq!(
            check_pool_name("a b"),
            Err("pool name \"a b\" may hold only letters, digits, '-', '_' and '.'".into())
        );
        assert!(check_pool_name("").is_err());
        assert!(check_pool_name("a#b").is_err());
    }

    #[test]
    fn logs_root_must_be_writable() {
        let root = std::env::temp_dir().join(format!("iw-logs-root-{}", uuid::Uuid::new_v4()));
        let yaml = |root: &str| format!("logs: {{root: '{root}'}}");
        let c = Config::from_yaml_and_env(&yaml(&root.display().to_string()), env(&[])).unwrap();
        c.check_logs_root().unwrap();
        assert!(root.is_dir());
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "the probe is removed"
        );
        std::fs::remove_dir_all(&root).unwrap();
        let c = Config::from_yaml_and_env(&yaml("/proc/nope"), env(&[])).unwrap();
        let e = c.check_logs_root().unwrap_err().to_string();
        assert!(
            e.starts_with("invalid configuration: logs.root /proc/nope cannot be written:"),
            "{e}"
        );
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = Config::from_yaml_and_env(
            "amqp: {url: 'amqp://user:hunter2@h/%2f'}\nregistry: {credentials: {r: {username: u, password: hunter2}}}",
            env(&[]),
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
