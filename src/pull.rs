//! The pull job: register an image that exists in a registry.
//!
//! Pull (or take the cached image when `pin_version` is set), inspect, optionally push to the
//! worker's mirror, discover. The record describes the image where the platform will run it from:
//! the mirror when there is one, else the source.

use std::time::Instant;

use crate::engine::{self, EngineError};
use crate::job::Job;
use crate::joblog::JobLog;
use crate::pipeline::{self, JobContext, JobError, JobEvents, with_registry_retries};
use crate::reference;
use crate::report::{Progress, Report};

pub async fn run_pull(
    ctx: &JobContext,
    job: &Job,
    log: &JobLog,
    events: &JobEvents,
    report: &mut Report,
) -> Result<(), JobError> {
    let repository = job.repository();
    let reference = job.source_reference();
    let tag_or_digest = job.digest.clone().unwrap_or_else(|| job.tag.clone());
    let registry = reference::registry_host(&job.push_url);
    // Checked before pulling: a group that cannot be a mirror namespace fails at once.
    let mirror = match &ctx.config.registry.mirror {
        Some(m) => Some(mirror_namespace(m, &job.group)?),
        None => None,
    };

    let cached = if job.pin_version {
        engine::inspect_image(&ctx.docker, &reference).await?
    } else {
        None
    };
    if cached.is_some() {
        log.info(format!(
            "pin_version is true and {reference} is cached on this worker: not pulling"
        ));
    } else {
        let (username, password) = pipeline::registry_credentials(ctx, job, registry)?;
        log.info(format!(
            "pulling {reference}{}{}",
            job.platform
                .as_deref()
                .map(|p| format!(" for {p}"))
                .unwrap_or_default(),
            match &username {
                Some(u) if job.username.is_some() => format!(" as {u} (job credentials)"),
                Some(u) => format!(" as {u} (worker credentials)"),
                None => String::new(),
            }
        ));
        events.running("pulling", Progress::default());
        let started = Instant::now();
        let creds = engine::credentials(registry, username.as_deref(), password.as_deref());
        let pulled = with_registry_retries(ctx, log, &format!("pulling {reference}"), || {
            engine::pull_image(
                &ctx.docker,
                &repository,
                &tag_or_digest,
                job.platform.as_deref(),
                creds.clone(),
                |p| events.running("pulling", p),
                |line| log.info(line),
            )
        })
        .await
        .map_err(|e| pull_error(e, &reference))?;
        ctx.metrics.add_bytes_pulled(pulled.current);
        log.info(format!(
            "pulled {reference}: {} bytes downloaded in {:.1} s",
            pulled.current,
            started.elapsed().as_secs_f64()
        ));
    }

    // A cache hit was inspected already; a pulled image is inspected now.
    let inspect = match cached {
        Some(inspect) => inspect,
        None => engine::inspect_image(&ctx.docker, &reference)
            .await?
            .ok_or_else(|| {
                JobError::new(
                    "engine",
                    format!("the engine does not list {reference} after pulling it"),
                    true,
                )
            })?,
    };
    // The engine pulls another platform's image with only a warning when the registry has none
    // for the one asked; a record of the wrong platform is not a success.
    if let Some(platform) = &job.platform {
        let got = format!(
            "{}/{}",
            inspect.os.as_deref().unwrap_or("?"),
            inspect.architecture.as_deref().unwrap_or("?")
        );
        if !platform.starts_with(&got) {
            return Err(JobError::new(
                "not_found",
                format!("{reference} has no {platform} image (the registry gave {got})"),
                false,
            ));
        }
    }
    pipeline::apply_inspect(ctx, report, &inspect);
    report.image = Some(reference.clone());
    report.digest = job
        .digest
        .clone()
        .or_else(|| engine::repo_digest(&inspect, &repository));
    log.info(format!(
        "image {} size {} bytes, digest {}",
        report.image_id.as_deref().unwrap_or("?"),
        report.size,
        report.digest.as_deref().unwrap_or("unknown")
    ));

    if let Some(namespace) = &mirror {
        push_to_mirror(ctx, job, log, events, report, namespace, &reference).await?;
    }

    if job.discover {
        pipeline::discover(ctx, log, events, report, &inspect, None).await?;
    } else {
        log.info("discovery skipped (discover: false)");
    }
    Ok(())
}

/// `<mirror>/<group>`: where a pulled image is mirrored. Groups are lowercased (repository
/// names are lowercase), so `QA-Team` and `qa-team` share a namespace.
fn mirror_namespace(mirror: &str, group: &str) -> Result<String, JobError> {
    let namespace = format!(
        "{}/{}",
        mirror.trim_end_matches('/'),
        group.to_ascii_lowercase()
    );
    reference::validate_push_url(&namespace).map_err(|e| {
        JobError::new(
            "invalid_job",
            format!("cannot mirror into group {group:?}: {e}"),
            false,
        )
    })?;
    Ok(namespace)
}

fn pull_error(e: EngineError, reference: &str) -> JobError {
    let mut err = JobError::from(e);
    err.message = match err.kind {
        "auth" => format!(
            "the registry refused the credentials for {reference}: {}",
            err.message
        ),
        "not_found" => format!(
            "{reference} does not exist in the registry: {}",
            err.message
        ),
        "registry_unreachable" => {
            format!("cannot reach the registry of {reference}: {}", err.message)
        }
        _ => format!("pulling {reference} failed: {}", err.message),
    };
    err
}

async fn push_to_mirror(
    ctx: &JobContext,
    job: &Job,
    log: &JobLog,
    events: &JobEvents,
    report: &mut Report,
    namespace: &str,
    reference: &str,
) -> Result<(), JobError> {
    let target_repo = format!("{namespace}/{}", job.name);
    let registry = reference::registry_host(namespace);
    engine::tag_image(&ctx.docker, reference, &target_repo, &job.tag).await?;
    log.info(format!("pushing to the mirror: {target_repo}:{}", job.tag));
    let (username, password) = match ctx.config.registry.credentials.get(registry) {
        Some(c) => (
            Some(c.username.clone()),
            c.resolve_password()
                .map_err(|e| JobError::new("internal", e.to_string(), false))?,
        ),
        None => (None, None),
    };
    let digest = pipeline::push(
        ctx,
        log,
        events,
        &target_repo,
        &job.tag,
        username.as_deref(),
        password.as_deref(),
    )
    .await?;
    report.push_url = namespace.to_string();
    report.image = Some(format!("{target_repo}:{}", job.tag));
    if digest.is_some() {
        report.digest = digest;
    }
    Ok(())
}
