//! The command line of DESIGN.md. Every command calls the same library code the tests use.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::daemon::{self, Shutdown};
use crate::discovery::{self, Source};
use crate::job::parse_job;
use crate::pipeline::{DeliveryInfo, JobContext, run_job};
use crate::report::WorkerInfo;
use crate::submit::{self, Submitted};

/// Exit code for a bad command line or configuration (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for input that is not a job (EX_DATAERR).
pub const EXIT_DATAERR: u8 = 65;
/// Exit code for a job file that cannot be read (EX_NOINPUT).
pub const EXIT_NOINPUT: u8 = 66;

/// A command line that cannot be acted on (an unset `--password-env` variable, a missing
/// `--yaml-file`, a build file or pool the worker would refuse): exit 64, EX_USAGE.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Parser, Debug)]
#[command(
    name = "image-worker",
    version,
    about = "Pulls and builds pyATS test images for the test-automation platform: takes jobs from \
             RabbitMQ, drives the Docker engine, finds the pyATS jobs and manifests inside each \
             image and reports the image record."
)]
pub struct Cli {
    /// Log format: `text` (human) or `json` (one JSON object a line).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "IMAGE_WORKER_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// Configuration file (YAML; see config/image-worker.yaml). Every key can be overridden
    /// with IMAGE_WORKER__<SECTION>__<KEY> environment variables.
    #[arg(long, short, env = "IMAGE_WORKER_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Run the daemon: consume jobs from RabbitMQ until SIGTERM (exit 64 when the configuration
    /// is invalid, an unwritable logs.root included).
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run one job here, without a broker, and print its report (exit 0 when successful, 1
    /// when the job failed, 64 when the configuration is invalid or logs.root cannot be
    /// written, 65 when the input is not a job, 66 when the file cannot be read).
    Job {
        /// Job file (JSON, as published to the broker), or `-` for standard input.
        file: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Publish a job to the broker; with --wait, print its report when it comes (exit 0 when
    /// successful, 1 when the job failed or the broker cannot be reached, 2 when --wait timed
    /// out, 64 for a job the worker would refuse, a bad --pool, an unset --password-env variable
    /// or an unreadable --password-file / --yaml-file).
    Submit {
        #[command(subcommand)]
        job: SubmitJob,
    },
    /// Cancel a job by uuid on every worker: a running job stops and reports `cancelled`; a job
    /// still queued is answered `cancelled` by the worker that takes it (if that worker heard
    /// the request).
    Cancel {
        /// The job's uuid.
        uuid: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the pyATS job files and manifests of a local image.
    Discover {
        /// Image reference or id, present in the local engine.
        image: String,
        /// Where the image's files are read from.
        #[arg(long, default_value = "auto", value_parser = ["auto", "layers", "archive"])]
        source: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check a configuration file and print the effective configuration (secrets hidden).
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigAction {
    /// Load, validate and print the effective configuration; exit 64 when it is invalid (a
    /// secret file that cannot be read or a logs.root that cannot be written included).
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum SubmitJob {
    /// Register an image: the worker pulls <push-url>/<name>:<tag>, inspects and discovers it.
    Pull(PullArgs),
    /// Build a custom pyATS image from a build file and push it to <push-url>/<name>:<tag>.
    Build(BuildArgs),
    /// Build the worker's polaris repository at a git ref (merged onto --base-ref when given).
    PolarisBuild(PolarisBuildArgs),
}

/// Registry credentials and job fields every build shares.
#[derive(Args, Debug)]
pub struct BuildCommon {
    /// Registry user for the push; the password comes from --password-env or --password-file.
    #[arg(long)]
    pub username: Option<String>,
    /// Environment variable holding the registry password.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
    /// File holding the registry password.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Do not look for jobs and manifests after the build.
    #[arg(long)]
    pub no_discover: bool,
    /// Job uuid (default: a new one).
    #[arg(long)]
    pub uuid: Option<String>,
    /// Seconds the job may run.
    #[arg(long)]
    pub timeout_s: Option<u64>,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Image name below the push URL, e.g. `team/pyats-custom`.
    #[arg(long)]
    pub name: String,
    /// Tag of the built image.
    #[arg(long, default_value = "latest")]
    pub tag: String,
    /// Registry and namespace the image is pushed to, e.g. `registry.example.com/team`.
    #[arg(long)]
    pub push_url: String,
    /// Group that owns the image.
    #[arg(long)]
    pub group: String,
    /// The build file (pyats-image-builder YAML), or `-` for standard input.
    #[arg(long)]
    pub yaml_file: String,
    #[command(flatten)]
    pub build: BuildCommon,
    #[command(flatten)]
    pub common: SubmitCommon,
}

#[derive(Args, Debug)]
pub struct PolarisBuildArgs {
    /// Branch, tag or commit to build.
    #[arg(long)]
    pub git_ref: String,
    /// Branch to merge --git-ref onto before building.
    #[arg(long)]
    pub base_ref: Option<String>,
    /// Image name, e.g. `polaris`.
    #[arg(long)]
    pub name: String,
    /// Tag of the built image.
    #[arg(long, default_value = "latest")]
    pub tag: String,
    /// Group that owns the image; the default destination is <polaris.push_url>/<group>.
    #[arg(long)]
    pub group: String,
    /// Registry and namespace to push to instead of the worker's polaris.push_url/<group>.
    #[arg(long)]
    pub push_url: Option<String>,
    #[command(flatten)]
    pub build: BuildCommon,
    #[command(flatten)]
    pub common: SubmitCommon,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image name below the push URL, e.g. `pyats`.
    #[arg(long)]
    pub name: String,
    /// Tag to pull.
    #[arg(long, default_value = "latest")]
    pub tag: String,
    /// Registry and namespace, e.g. `registry.example.com/team`.
    #[arg(long)]
    pub push_url: String,
    /// Group that owns the image.
    #[arg(long)]
    pub group: String,
    /// Registry user; the password comes from --password-env or --password-file.
    #[arg(long)]
    pub username: Option<String>,
    /// Environment variable holding the registry password.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
    /// File holding the registry password.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Pull by digest (`sha256:...`) instead of the tag.
    #[arg(long)]
    pub digest: Option<String>,
    /// Platform to pull, e.g. `linux/amd64`.
    #[arg(long)]
    pub platform: Option<String>,
    /// Use the worker's cached image when it has one.
    #[arg(long)]
    pub pin_version: bool,
    /// Do not look for jobs and manifests.
    #[arg(long)]
    pub no_discover: bool,
    /// Job uuid (default: a new one).
    #[arg(long)]
    pub uuid: Option<String>,
    /// Seconds the job may run.
    #[arg(long)]
    pub timeout_s: Option<u64>,
    #[command(flatten)]
    pub common: SubmitCommon,
}

#[derive(Args, Debug)]
pub struct SubmitCommon {
    /// Worker pool to send the job to (default: the configured worker.group); letters,
    /// digits, '-', '_' and '.'.
    #[arg(long)]
    pub pool: Option<String>,
    /// Wait for the final report and print it (exit 0 when successful, 1 when not, 2 on timeout).
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 600)]
    pub wait_timeout_s: u64,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Sets up logging: human text on a terminal, JSON lines when asked. `RUST_LOG` filters.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,lapin=warn,amq_protocol=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn load_config(arg: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(arg.config.as_deref()).map_err(|e| {
        eprintln!("image-worker: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run { config } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(e) = config.check_logs_root() {
                eprintln!("image-worker: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
            daemon::run(config, Shutdown::from_signals())
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Job { file, config } => match load_config(&config) {
            Ok(c) => run_local_job(c, &file).await,
            Err(code) => return code,
        },
        Command::Submit { job } => match job {
            SubmitJob::Pull(args) => submit_pull(args).await,
            SubmitJob::Build(args) => submit_build(args).await,
            SubmitJob::PolarisBuild(args) => submit_polaris_build(args).await,
        },
        Command::Cancel { uuid, config } => match load_config(&config) {
            Ok(c) => submit::cancel(&c, &uuid).await.map(|()| {
                eprintln!("cancel requested for {uuid}");
                ExitCode::SUCCESS
            }),
            Err(code) => return code,
        },
        Command::Discover {
            image,
            source,
            config,
        } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let source: Source = match source.parse() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("image-worker: --source: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            discover(config, &image, source).await
        }
        Command::Config {
            action: ConfigAction::Check { config },
        } => match load_config(&config) {
            Ok(c) => {
                if let Err(e) = c.check_logs_root() {
                    eprintln!("image-worker: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
                println!(
                    "{}",
                    serde_yaml::to_string(&shown_config(&c)).unwrap_or_default()
                );
                eprintln!("configuration is valid");
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => return code,
        },
    };
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("image-worker: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!(
                "image-worker: {}",
                crate::secrets::mask_url_credentials(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

/// The configuration with secrets replaced, for `config check`.
fn shown_config(config: &Config) -> Value {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    if let Some(url) = value.pointer_mut("/amqp/url") {
        *url = Value::String(crate::secrets::mask_url_credentials(
            url.as_str().unwrap_or_default(),
        ));
    }
    crate::secrets::SecretMask::default().mask_json(&mut value);
    value
}

async fn run_local_job(config: Config, file: &str) -> anyhow::Result<ExitCode> {
    let mut body = Vec::new();
    if file == "-" {
        std::io::stdin()
            .read_to_end(&mut body)
            .context("reading the job from stdin")?;
    } else {
        body = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("image-worker: cannot read {file}: {e}");
                return Ok(ExitCode::from(EXIT_NOINPUT));
            }
        };
    }
    let input = match parse_job(&body, config.jobs.max_message_bytes) {
        Ok(input) => input,
        Err(rejection) => {
            eprintln!("image-worker: not a job: {rejection}");
            return Ok(ExitCode::from(EXIT_DATAERR));
        }
    };
    // After the input's own checks (65, 66): a report whose logs_dir holds nothing is worse
    // than none.
    if let Err(e) = config.check_logs_root() {
        eprintln!("image-worker: {e}");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    // An engine that does not answer still gets a report: failed, engine_unavailable. The
    // client below is never called then; the context just needs one.
    let (docker, input) = match crate::engine::connect(config.docker.host.as_deref()).await {
        Ok(d) => (d, input),
        Err(e) => {
            let input = input.and_then(|job| {
                Err(crate::job::InvalidJob::cannot_start(
                    &job,
                    "engine_unavailable",
                    e.message,
                    true,
                ))
            });
            (bollard::Docker::connect_with_local_defaults()?, input)
        }
    };
    let worker = WorkerInfo::from_config(&config.worker);
    let ctx = JobContext {
        config,
        docker,
        worker,
        metrics: Default::default(),
        cache: Default::default(),
    };
    let finished = run_job(
        &ctx,
        input,
        DeliveryInfo::default(),
        None,
        &Default::default(),
    )
    .await;
    let value: Value = serde_json::from_slice(&finished.json)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(
        if finished.report.status == crate::report::Status::Successful {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

async fn discover(config: Config, image: &str, source: Source) -> anyhow::Result<ExitCode> {
    let docker = crate::engine::connect(config.docker.host.as_deref()).await?;
    let mut options = config.discovery.options();
    options.source = source;
    let started = std::time::Instant::now();
    let found = discovery::discover_image(&docker, image, &options).await?;
    eprintln!(
        "{} job files, {} manifests, {} warnings; {} files scanned from {} in {} ms",
        found.jobs.len(),
        found.manifests.len(),
        found.warnings.len(),
        found.files_scanned,
        found.source,
        started.elapsed().as_millis()
    );
    println!("{}", serde_json::to_string_pretty(&found)?);
    Ok(ExitCode::SUCCESS)
}

fn read_password(env: Option<&str>, file: Option<&PathBuf>) -> Result<Option<String>, UsageError> {
    if let Some(var) = env {
        return std::env::var(var)
            .map(Some)
            .map_err(|e| UsageError(format!("--password-env: {var}: {e}")));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            UsageError(format!(
                "--password-file: cannot read {}: {e}",
                path.display()
            ))
        })?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    Ok(None)
}

async fn submit_pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let config = match load_config(&args.common.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut job = Map::new();
    let mut put = |k: &str, v: Value| {
        job.insert(k.to_string(), v);
    };
    put(
        "uuid",
        Value::from(
            args.uuid
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        ),
    );
    put("type", Value::from("pull"));
    put("group", Value::from(args.group));
    put("name", Value::from(args.name));
    put("tag", Value::from(args.tag));
    put("push_url", Value::from(args.push_url));
    put("discover", Value::from(!args.no_discover));
    put("pin_version", Value::from(args.pin_version));
    put(
        "submitter",
        Value::from(std::env::var("USER").unwrap_or_else(|_| "cli".into())),
    );
    if let Some(u) = args.username {
        put("username", Value::from(u));
    }
    if let Some(p) = read_password(args.password_env.as_deref(), args.password_file.as_ref())? {
        put("password", Value::from(p));
    }
    if let Some(d) = args.digest {
        put("digest", Value::from(d));
    }
    if let Some(p) = args.platform {
        put("platform", Value::from(p));
    }
    if let Some(t) = args.timeout_s {
        put("timeout_s", Value::from(t));
    }
    submit_and_print(&config, job, &args.common).await
}

/// The fields every job has, from the command line.
fn base_job(
    uuid: Option<String>,
    job_type: &str,
    group: String,
    name: String,
    tag: String,
) -> Map<String, Value> {
    let mut job = Map::new();
    job.insert(
        "uuid".into(),
        Value::from(uuid.unwrap_or_else(|| uuid::Uuid::new_v4().to_string())),
    );
    job.insert("type".into(), Value::from(job_type));
    job.insert("group".into(), Value::from(group));
    job.insert("name".into(), Value::from(name));
    job.insert("tag".into(), Value::from(tag));
    job.insert(
        "submitter".into(),
        Value::from(std::env::var("USER").unwrap_or_else(|_| "cli".into())),
    );
    job
}

fn put_build_common(job: &mut Map<String, Value>, args: BuildCommon) -> anyhow::Result<()> {
    job.insert("discover".into(), Value::from(!args.no_discover));
    if let Some(u) = args.username {
        job.insert("username".into(), Value::from(u));
    }
    if let Some(p) = read_password(args.password_env.as_deref(), args.password_file.as_ref())? {
        job.insert("password".into(), Value::from(p));
    }
    if let Some(t) = args.timeout_s {
        job.insert("timeout_s".into(), Value::from(t));
    }
    Ok(())
}

async fn submit_build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let config = match load_config(&args.common.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let yaml = if args.yaml_file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| UsageError(format!("--yaml-file: cannot read standard input: {e}")))?;
        text
    } else {
        std::fs::read_to_string(&args.yaml_file)
            .map_err(|e| UsageError(format!("--yaml-file: cannot read {}: {e}", args.yaml_file)))?
    };
    // The worker's parser, here first: a build file it would refuse is not sent.
    if let Err(e) = crate::build::file::parse(&yaml, config.build.max_yaml_bytes) {
        return Err(UsageError(format!("invalid job: {e}")).into());
    }
    let mut job = base_job(
        args.build.uuid.clone(),
        "build",
        args.group,
        args.name,
        args.tag,
    );
    job.insert("push_url".into(), Value::from(args.push_url));
    job.insert("yaml_content".into(), Value::from(yaml));
    put_build_common(&mut job, args.build)?;
    submit_and_print(&config, job, &args.common).await
}

async fn submit_polaris_build(args: PolarisBuildArgs) -> anyhow::Result<ExitCode> {
    let config = match load_config(&args.common.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut job = base_job(
        args.build.uuid.clone(),
        "polaris_build",
        args.group,
        args.name,
        args.tag,
    );
    job.insert("git_ref".into(), Value::from(args.git_ref));
    if let Some(b) = args.base_ref {
        job.insert("base_ref".into(), Value::from(b));
    }
    if let Some(p) = args.push_url {
        job.insert("push_url".into(), Value::from(p));
    }
    put_build_common(&mut job, args.build)?;
    submit_and_print(&config, job, &args.common).await
}

async fn submit_and_print(
    config: &Config,
    job: Map<String, Value>,
    common: &SubmitCommon,
) -> anyhow::Result<ExitCode> {
    // The worker's own checks, here first: a job it would refuse is not sent.
    let body = serde_json::to_vec(&job)?;
    match parse_job(&body, config.jobs.max_message_bytes) {
        Err(rejection) => {
            eprintln!("image-worker: not a job: {rejection}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Ok(Err(invalid)) => {
            eprintln!("image-worker: invalid job: {}", invalid.message);
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Ok(Ok(_)) => {}
    }
    let pool = common
        .pool
        .clone()
        .unwrap_or_else(|| config.worker.group.clone());
    crate::config::check_pool_name(&pool).map_err(|e| UsageError(format!("--pool: {e}")))?;
    let wait = common
        .wait
        .then(|| Duration::from_secs(common.wait_timeout_s));
    match submit::submit(config, job, &pool, wait).await? {
        Submitted::Queued { uuid } => {
            println!("{uuid}");
            Ok(ExitCode::SUCCESS)
        }
        Submitted::Report { status, json } => {
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(if status == "successful" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Submitted::TimedOut { uuid } => {
            eprintln!(
                "image-worker: no report for {uuid} within {} s (the job may still be queued or running)",
                common.wait_timeout_s
            );
            Ok(ExitCode::from(2))
        }
    }
}
