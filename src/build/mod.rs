//! Building images. Two job types share one path:
//! - `build` ([`pyats`]): a custom pyATS image from a build file (`yaml_content`);
//! - `polaris_build` ([`polaris`]): the configured repository at a git ref.
//!
//! Each makes its build context in memory ([`context`]), then [`build_push_discover`] builds it
//! with the engine's legacy builder and ends like a pull: push, inspect, discover, report.

pub mod context;
pub mod fetch;
pub mod file;
pub mod git;
pub mod polaris;
pub mod pyats;

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::{BuildImageOptionsBuilder, BuilderVersion};

use crate::discovery::JobRules;
use crate::engine::{self, BuildOutcome};
use crate::job::Job;
use crate::joblog::JobLog;
use crate::pipeline::{self, JobContext, JobError, JobEvents};
use crate::reference;
use crate::report::{Progress, Report};

/// The workspace of a built pyATS image (`$WORKSPACE`), where discovery looks.
pub const WORKSPACE: &str = "/pyats";
/// The virtual environment packages are installed into (Debian and python:*-slim images alike;
/// a venv keeps clear of PEP 668's "externally managed" system Python).
pub const VENV: &str = "/venv";

/// An image to build and publish.
pub struct ImageBuild {
    /// The context, a tar.
    pub context: Vec<u8>,
    /// Path of the Dockerfile inside the context.
    pub dockerfile: String,
    pub build_args: HashMap<String, String>,
    /// Registry and namespace the image is pushed to (the report's `push_url`).
    pub namespace: String,
    /// `<namespace>/<name>`.
    pub repository: String,
    pub tag: String,
    /// Job-file rules added to the configured ones for this image's discovery.
    pub rules: JobRules,
}

/// Builds, pushes, inspects and discovers; fills the report.
pub async fn build_push_discover(
    ctx: &JobContext,
    job: &Job,
    log: &JobLog,
    events: &JobEvents,
    report: &mut Report,
    build: ImageBuild,
) -> Result<(), JobError> {
    let reference = format!("{}:{}", build.repository, build.tag);
    let registry = reference::registry_host(&build.namespace).to_string();
    let (username, password) = pipeline::registry_credentials(ctx, job, &registry)?;

    log.info(format!(
        "building {reference} from a {} byte context (legacy builder)",
        build.context.len()
    ));
    events.running("building", Progress::default());
    let started = Instant::now();
    let mut options = BuildImageOptionsBuilder::default()
        .dockerfile(&build.dockerfile)
        .t(&reference)
        .rm(true)
        .forcerm(true)
        .version(BuilderVersion::BuilderV1);
    if !build.build_args.is_empty() {
        options = options.buildargs(&build.build_args);
    }
    let keep = ctx.config.build.error_tail_lines.max(1);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(keep);
    let outcome = engine::build_image(
        &ctx.docker,
        options.build(),
        base_image_credentials(ctx, &registry, username.as_deref(), password.as_deref())?,
        build.context,
        |line| {
            log.info(format!("build: {line}"));
            if let Some((step, steps)) = build_step(&line) {
                events.running(
                    "building",
                    Progress {
                        current: step,
                        total: Some(steps),
                    },
                );
            }
            if tail.len() == keep {
                tail.pop_front();
            }
            // Each quoted line as job.log keeps it: one huge line cannot fill the report.
            tail.push_back(
                crate::joblog::truncate_line(&line, crate::joblog::MAX_LINE_BYTES).into_owned(),
            );
        },
    )
    .await?;
    match outcome {
        BuildOutcome::Failed { message } => {
            let last: Vec<String> = tail.into_iter().collect();
            return Err(JobError::new(
                "build",
                format!(
                    "the build of {reference} failed: {message}\nlast build output:\n{}",
                    last.join("\n")
                ),
                false,
            ));
        }
        BuildOutcome::Built { image_id } => log.info(format!(
            "built {reference} ({}) in {:.1} s",
            image_id.as_deref().unwrap_or("no id reported"),
            started.elapsed().as_secs_f64()
        )),
    }

    log.info(format!(
        "pushing {reference}{}",
        match &username {
            Some(u) if job.username.is_some() => format!(" as {u} (job credentials)"),
            Some(u) => format!(" as {u} (worker credentials)"),
            None => String::new(),
        }
    ));
    let digest = pipeline::push(
        ctx,
        log,
        events,
        &build.repository,
        &build.tag,
        username.as_deref(),
        password.as_deref(),
    )
    .await?;

    let inspect = engine::inspect_image(&ctx.docker, &reference)
        .await?
        .ok_or_else(|| {
            JobError::new(
                "engine",
                format!("the engine does not list {reference} after building it"),
                true,
            )
        })?;
    pipeline::apply_inspect(ctx, report, &inspect);
    report.image = Some(reference.clone());
    report.push_url = build.namespace.clone();
    report.digest = digest.or_else(|| engine::repo_digest(&inspect, &build.repository));
    log.info(format!(
        "image {} size {} bytes, digest {}",
        report.image_id.as_deref().unwrap_or("?"),
        report.size,
        report.digest.as_deref().unwrap_or("unknown")
    ));

    if job.discover {
        pipeline::discover(ctx, log, events, report, &inspect, Some(&build.rules)).await?;
    } else {
        log.info("discovery skipped (discover: false)");
    }
    Ok(())
}

/// Credentials the engine may need to pull `FROM` images: the worker's, and the job's for its
/// own registry.
fn base_image_credentials(
    ctx: &JobContext,
    registry: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<HashMap<String, DockerCredentials>, JobError> {
    let mut out = HashMap::new();
    for (host, creds) in &ctx.config.registry.credentials {
        let password = creds.resolve_password().map_err(|e| {
            JobError::new(
                "internal",
                format!("worker credentials for {host}: {e}"),
                false,
            )
        })?;
        if let Some(c) = engine::credentials(host, Some(&creds.username), password.as_deref()) {
            out.insert(host.clone(), c);
        }
    }
    if let Some(c) = engine::credentials(registry, username, password) {
        out.insert(registry.to_string(), c);
    }
    Ok(out)
}

/// `Step 3/9 : RUN ...` → (3, 9).
fn build_step(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("Step ")?;
    let (frac, _) = rest.split_once(' ')?;
    let (n, total) = frac.split_once('/')?;
    Some((n.parse().ok()?, total.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_build_steps() {
        assert_eq!(super::build_step("Step 3/9 : RUN x"), Some((3, 9)));
        assert_eq!(super::build_step(" ---> Running in abc"), None);
    }
}
