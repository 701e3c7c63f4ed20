//! The `polaris_build` job: the configured repository at `git_ref` (merged onto `base_ref` when
//! given), built with the repository's own Dockerfile and build args `GIT_REF` and `BASE_REF`.
//!
//! The repository is kept as a bare mirror clone under `polaris.state_dir`: the first job clones
//! it, later ones only fetch. Each job checks out into a scratch directory that shares the
//! mirror's objects and is removed once the context is in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::context::ContextTar;
use super::git::{Git, Scratch};
use super::{ImageBuild, file};
use crate::discovery::JobRules;
use crate::job::Job;
use crate::joblog::JobLog;
use crate::pipeline::{JobContext, JobError, JobEvents};
use crate::reference;
use crate::report::Report;
use crate::secrets::mask_url_credentials;

pub async fn run_polaris_build(
    ctx: &JobContext,
    job: &Job,
    log: &JobLog,
    events: &JobEvents,
    report: &mut Report,
) -> Result<(), JobError> {
    let cfg = &ctx.config.polaris;
    let Some(url) = cfg.repository.as_deref() else {
        return Err(JobError::new(
            "unsupported",
            "this worker has no polaris repository configured (polaris.repository)",
            false,
        ));
    };
    let git_ref = job.git_ref.as_deref().unwrap_or_default();
    check_ref("git_ref", git_ref)?;
    let base_ref = job.base_ref.as_deref().filter(|b| !b.is_empty());
    if let Some(b) = base_ref {
        check_ref("base_ref", b)?;
    }
    let namespace = namespace(job, cfg.push_url.as_deref())?;
    let dockerfile = file::workspace_path("polaris.dockerfile", &cfg.dockerfile)
        .map_err(|e| JobError::new("internal", e.to_string(), false))?;
    let shown = mask_url_credentials(url);

    let mirror = mirror_path(&cfg.state_dir, url);
    let lock = mirror_lock(&mirror);
    let guard = lock.lock().await;
    let git = Git::worker();
    update_mirror(&git, url, &mirror, log).await?;
    let commit = resolve(&git, &mirror, git_ref, &shown, log).await?;
    let base_commit = match base_ref {
        Some(b) => Some(resolve(&git, &mirror, b, &shown, log).await?),
        None => None,
    };

    let scratch = Scratch::new("polaris")?;
    let work = scratch.path().join("src");
    let mirror_s = mirror.display().to_string();
    let work_s = work.display().to_string();
    git.run(
        None,
        &[
            "clone",
            "--quiet",
            "--shared",
            "--no-checkout",
            "--",
            &mirror_s,
            &work_s,
        ],
        log,
    )
    .await
    .map_err(|e| JobError::new("git", e.message, true))?;
    let checkout = |sha: &str| {
        let sha = sha.to_string();
        let git = &git;
        let work = &work;
        async move {
            git.run(
                Some(work),
                &[
                    "-c",
                    "advice.detachedHead=false",
                    "checkout",
                    "--quiet",
                    "--detach",
                    &sha,
                    "--",
                ],
                log,
            )
            .await
            .map_err(|e| JobError::new("git", e.message, false))
        }
    };
    match (&base_commit, base_ref) {
        (Some(base), Some(base_name)) => {
            checkout(base).await?;
            log.info(format!(
                "merging {git_ref} ({commit}) onto {base_name} ({base})"
            ));
            let message = format!("image-worker: merge {git_ref} onto {base_name}");
            let merged = git
                .run(
                    Some(&work),
                    &[
                        "-c",
                        "user.name=image-worker",
                        "-c",
                        "user.email=image-worker@localhost",
                        "merge",
                        "--no-ff",
                        "--no-edit",
                        "-m",
                        &message,
                        &commit,
                    ],
                    log,
                )
                .await;
            if let Err(e) = merged {
                let conflicts = git
                    .run(
                        Some(&work),
                        &["diff", "--name-only", "--diff-filter=U"],
                        log,
                    )
                    .await
                    .unwrap_or_default();
                let paths: Vec<&str> = conflicts.lines().filter(|l| !l.is_empty()).collect();
                return Err(if paths.is_empty() {
                    JobError::new(
                        "git",
                        format!("merging {git_ref} onto {base_name} failed: {}", e.message),
                        false,
                    )
                } else {
                    JobError::new(
                        "merge_conflict",
                        format!(
                            "merging {git_ref} onto {base_name} conflicts in: {}",
                            paths.join(", ")
                        ),
                        false,
                    )
                });
            }
        }
        _ => {
            checkout(&commit).await?;
        }
    }
    let tree = git
        .run(Some(&work), &["rev-parse", "HEAD"], log)
        .await
        .map_err(|e| JobError::new("git", e.message, false))?;
    if !work.join(&dockerfile).is_file() {
        return Err(JobError::new(
            "not_found",
            format!("{shown} has no {dockerfile} at {git_ref}"),
            false,
        ));
    }
    let mut tar = ContextTar::new(ctx.config.build.max_context_bytes);
    let files = tar.tree("", &work, true)?;
    drop(scratch);
    drop(guard);
    log.info(format!("context ready: {files} files of {shown} at {tree}"));
    report
        .data
        .insert("git_commit".into(), Value::from(commit.clone()));
    if let Some(b) = &base_commit {
        report
            .data
            .insert("base_commit".into(), Value::from(b.clone()));
        report
            .data
            .insert("merge_commit".into(), Value::from(tree.clone()));
    }

    let build_args = HashMap::from([
        ("GIT_REF".to_string(), git_ref.to_string()),
        (
            "BASE_REF".to_string(),
            base_ref.unwrap_or_default().to_string(),
        ),
    ]);
    super::build_push_discover(
        ctx,
        job,
        log,
        events,
        report,
        ImageBuild {
            context: tar.finish()?,
            dockerfile,
            build_args,
            repository: format!("{namespace}/{}", job.name),
            namespace,
            tag: job.tag.clone(),
            rules: JobRules::default(),
        },
    )
    .await
}

/// The job's `push_url`, else `<polaris.push_url>/<group>`.
fn namespace(job: &Job, default: Option<&str>) -> Result<String, JobError> {
    let namespace = if !job.push_url.is_empty() {
        job.push_url.clone()
    } else if let Some(base) = default {
        format!(
            "{}/{}",
            base.trim_end_matches('/'),
            job.group.to_ascii_lowercase()
        )
    } else {
        return Err(JobError::new(
            "invalid_job",
            "the job has no push_url and the worker no polaris.push_url",
            false,
        ));
    };
    reference::validate_push_url(&namespace)
        .and_then(|()| reference::repository(&namespace, &job.name).map(|_| ()))
        .map_err(|e| {
            JobError::new(
                "invalid_job",
                format!("cannot push to {namespace}: {e}"),
                false,
            )
        })?;
    Ok(namespace)
}

/// A ref is handed to git as one argument: it must not look like an option or hold odd bytes.
fn check_ref(field: &str, r: &str) -> Result<(), JobError> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && !r.starts_with('-')
        && !r.contains("..")
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-@^~{}+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(JobError::new(
            "invalid_job",
            format!("{field} {r:?} is not a branch, tag or commit name"),
            false,
        ))
    }
}

/// `<state_dir>/mirrors/<last path segment>-<hash of the URL>.git`.
fn mirror_path(state_dir: &Path, url: &str) -> PathBuf {
    let hash: String = Sha256::digest(url.as_bytes())
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let stem: String = url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("repo")
        .trim_end_matches(".git")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect();
    state_dir.join("mirrors").join(format!("{stem}-{hash}.git"))
}

/// One job at a time per mirror in this process (fetches must not overlap).
fn mirror_lock(path: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(path.to_path_buf())
        .or_default()
        .clone()
}

async fn update_mirror(git: &Git, url: &str, mirror: &Path, log: &JobLog) -> Result<(), JobError> {
    let shown = mask_url_credentials(url);
    let mirror_s = mirror.display().to_string();
    if mirror.join("HEAD").is_file() {
        log.info(format!(
            "polaris: fetching {shown} into the cached mirror {mirror_s}"
        ));
        git.run(
            Some(mirror),
            &["fetch", "--quiet", "--prune", "origin"],
            log,
        )
        .await
        .map_err(|e| JobError::new("git", format!("fetching {shown}: {}", e.message), true))?;
        return Ok(());
    }
    log.info(format!(
        "polaris: no cached mirror yet: cloning {shown} into {mirror_s}"
    ));
    let parent = mirror.parent().expect("a mirror path has a parent");
    std::fs::create_dir_all(parent).map_err(|e| {
        JobError::new(
            "internal",
            format!("cannot create {}: {e}", parent.display()),
            false,
        )
    })?;
    let partial = parent.join(format!(".clone-{}", uuid::Uuid::new_v4().simple()));
    let partial_s = partial.display().to_string();
    let cloned = git
        .run(
            None,
            &["clone", "--quiet", "--mirror", "--", url, &partial_s],
            log,
        )
        .await;
    if let Err(e) = cloned {
        let _ = std::fs::remove_dir_all(&partial);
        let kind = if e.message.contains("does not exist") || e.message.contains("not found") {
            "not_found"
        } else {
            "git"
        };
        return Err(JobError::new(
            kind,
            format!("cloning {shown}: {}", e.message),
            kind == "git",
        ));
    }
    std::fs::rename(&partial, mirror).map_err(|e| {
        let _ = std::fs::remove_dir_all(&partial);
        JobError::new(
            "internal",
            format!("cannot move the mirror into place: {e}"),
            true,
        )
    })
}

async fn resolve(
    git: &Git,
    mirror: &Path,
    r: &str,
    shown: &str,
    log: &JobLog,
) -> Result<String, JobError> {
    let spec = format!("{r}^{{commit}}");
    git.run(
        Some(mirror),
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            &spec,
        ],
        log,
    )
    .await
    .ok()
    .filter(|sha| !sha.is_empty())
    .ok_or_else(|| {
        JobError::new(
            "not_found",
            format!("{r} is not a branch, tag or commit of {shown}"),
            false,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_cannot_be_options() {
        for bad in ["--upload-pack=x", "-b", "a..b", "a b", "", "x;y"] {
            assert!(check_ref("git_ref", bad).is_err(), "{bad}");
        }
        for good in [
            "main",
            "feature/x-1",
            "v1.2.3",
            "abc123",
            "HEAD~1",
            "release@{1}",
        ] {
            assert!(check_ref("git_ref", good).is_ok(), "{good}");
        }
    }

    #[test]
    fn mirror_paths_are_stable_and_distinct() {
        let a = mirror_path(
            Path::new("/s"),
            "https://git.example.com/polaris/polaris.git",
        );
        assert_eq!(
            a,
            mirror_path(
                Path::new("/s"),
                "https://git.example.com/polaris/polaris.git"
            )
        );
        assert!(
            a.display().to_string().starts_with("/s/mirrors/polaris-"),
            "{}",
            a.display()
        );
        assert_ne!(
            a,
            mirror_path(
                Path::new("/s"),
                "https://other.example.com/polaris/polaris.git"
            )
        );
    }
}
