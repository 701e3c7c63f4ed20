//! The `build` job: a custom pyATS image from a build file (`yaml_content`).
//!
//! The worker fetches everything itself (repositories with `git`, `files` over http(s) or from
//! the allow-list) into an in-memory context, writes the Dockerfile and the installation
//! records, and builds. Values from the build file never become Dockerfile syntax: they are
//! files in the context, JSON-quoted exec-form arguments, or escaped `ENV` values.
//!
//! Context layout: `pip.conf` (copied to the venv) and `workspace/` (copied to `/pyats`), with
//! `workspace/installation/{Dockerfile,requirements.txt,jobfiles.txt,manifest.json}`.

use std::collections::BTreeMap;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::context::{ContextTar, env_pair, json};
use super::file::{self, BuildFile, FileSource, Repository};
use super::git::{Git, GitAuth, Scratch, local_path};
use super::{ImageBuild, VENV, WORKSPACE, fetch};
use crate::job::Job;
use crate::joblog::JobLog;
use crate::pipeline::{JobContext, JobError, JobEvents};
use crate::report::Report;
use crate::secrets::mask_url_credentials;

const DOCKERFILE: &str = "workspace/installation/Dockerfile";

pub async fn run_build(
    ctx: &JobContext,
    job: &Job,
    log: &JobLog,
    events: &JobEvents,
    report: &mut Report,
) -> Result<(), JobError> {
    let text = job.yaml_content.as_deref().unwrap_or_default();
    let build_file = file::parse(text, ctx.config.build.max_yaml_bytes)
        .map_err(|e| JobError::new("invalid_job", e.to_string(), false))?;
    if let Some(tag) = &build_file.tag {
        log.info(format!(
            "the build file's tag {tag:?} is not used: the job names the image ({}:{})",
            job.repository(),
            job.tag
        ));
    }
    let python = build_file
        .python
        .clone()
        .unwrap_or_else(|| ctx.config.build.default_python.clone());
    let base_image = ctx
        .config
        .build
        .base_image_template
        .replace("{python}", &python);
    log.info(format!("base image {base_image} (python {python})"));
    events.running("building", Default::default());

    let mut tar = ContextTar::new(ctx.config.build.max_context_bytes);
    let mut requirements: Vec<String> = Vec::new();
    let mut repositories = Vec::new();
    for repo in &build_file.repositories {
        let commit = clone_repository(ctx, log, repo, &build_file, &mut tar).await?;
        let path = format!("{WORKSPACE}/{}", repo.name);
        if repo.requirements_file {
            requirements.push(format!("--requirement {path}/requirements.txt"));
        }
        repositories.push(json!({
            "name": repo.name,
            "path": path,
            "url": mask_url_credentials(&repo.url),
            "commit": commit,
        }));
    }
    let mut files = Vec::new();
    for entry in &build_file.files {
        files.push(add_file(ctx, log, entry, &build_file, &mut tar).await?);
    }
    requirements.extend(build_file.packages.iter().cloned());

    let dockerfile = dockerfile(&base_image, &build_file, !requirements.is_empty());
    let manifest = json!({
        "version": 1,
        "builder": concat!("image-worker ", env!("CARGO_PKG_VERSION")),
        "base_image": base_image,
        "python": python,
        "workspace": WORKSPACE,
        "virtual_env": VENV,
        "packages": build_file.packages,
        "repositories": repositories,
        "files": files,
        "env": build_file.env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "jobfiles": build_file.jobfiles,
    });
    let mut requirements_txt = requirements.join("\n");
    requirements_txt.push('\n');
    let mut jobfiles_txt: String = build_file
        .jobfiles
        .paths
        .iter()
        .map(|p| format!("{p}\n"))
        .collect();
    if jobfiles_txt.is_empty() {
        jobfiles_txt.push_str("# job files listed by the build file's jobfiles.paths (none)\n");
    }
    tar.file(
        "workspace/installation/requirements.txt",
        requirements_txt.as_bytes(),
        false,
    )?;
    tar.file(
        "workspace/installation/jobfiles.txt",
        jobfiles_txt.as_bytes(),
        false,
    )?;
    tar.file(
        "workspace/installation/manifest.json",
        serde_json::to_string_pretty(&manifest)
            .expect("a manifest serializes")
            .as_bytes(),
        false,
    )?;
    tar.file(DOCKERFILE, dockerfile.as_bytes(), false)?;
    if let Some(pip) = &build_file.pip_config {
        tar.file("pip.conf", pip.as_bytes(), false)?;
    }
    log.info(format!(
        "context ready: {} repositories, {} files, {} requirement lines",
        build_file.repositories.len(),
        build_file.files.len(),
        requirements.len()
    ));
    for line in dockerfile.lines() {
        log.info(format!("Dockerfile: {line}"));
    }

    // Proxies are build-time only: the engine's predefined proxy build args, never in the image.
    let build_args = build_file
        .proxy
        .vars()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    super::build_push_discover(
        ctx,
        job,
        log,
        events,
        report,
        ImageBuild {
            context: tar.finish()?,
            dockerfile: DOCKERFILE.into(),
            build_args,
            namespace: job.push_url.clone(),
            repository: job.repository(),
            tag: job.tag.clone(),
            rules: build_file.jobfiles.clone(),
        },
    )
    .await
}

/// The Dockerfile. Every value from the build file is JSON-quoted (exec form) or an escaped
/// `ENV` value; packages, pip config and files are context files, never Dockerfile text.
pub fn dockerfile(base_image: &str, build: &BuildFile, has_requirements: bool) -> String {
    let mut d = String::new();
    d.push_str(&format!("FROM {base_image}\n"));
    d.push_str(&format!(
        "ENV WORKSPACE={WORKSPACE} VIRTUAL_ENV={VENV} PATH={VENV}/bin:$PATH\n"
    ));
    d.push_str(&format!(
        "RUN [\"python3\", \"-m\", \"venv\", \"{VENV}\"]\n"
    ));
    d.push_str(&format!("WORKDIR {WORKSPACE}\n"));
    for (k, v) in &build.env {
        d.push_str(&format!("ENV {}\n", env_pair(k, v)));
    }
    if build.pip_config.is_some() {
        d.push_str(&format!("COPY pip.conf {VENV}/pip.conf\n"));
    }
    d.push_str(&format!("COPY workspace/ {WORKSPACE}/\n"));
    if let Some(pre) = &build.cmds_pre {
        d.push_str(&format!("RUN [\"/bin/sh\", \"-c\", {}]\n", json(pre)));
    }
    if has_requirements {
        d.push_str(&format!(
            "RUN [\"{VENV}/bin/python\", \"-m\", \"pip\", \"install\", \"--no-cache-dir\", \"--disable-pip-version-check\", \"--requirement\", \"{WORKSPACE}/installation/requirements.txt\"]\n"
        ));
    }
    if let Some(post) = &build.cmds_post {
        d.push_str(&format!("RUN [\"/bin/sh\", \"-c\", {}]\n", json(post)));
    }
    d
}

/// Clones one repository into the context (worktree only, no `.git`); returns its commit.
async fn clone_repository(
    ctx: &JobContext,
    log: &JobLog,
    repo: &Repository,
    build: &BuildFile,
    tar: &mut ContextTar,
) -> Result<String, JobError> {
    let what = format!("repositories.{}", repo.name);
    let shown = mask_url_credentials(&repo.url);
    // A local repository is this host's filesystem: only under the allow-list, by its real path.
    let (url, local) = match local_path(&repo.url) {
        Some(path) => {
            let real = fetch::allowed_local_path(&path, &ctx.config.build.files_allow).map_err(
                |mut e| {
                    e.message = format!("{what}: {}", e.message);
                    e
                },
            )?;
            (format!("file://{}", real.display()), true)
        }
        None => (repo.url.clone(), false),
    };
    let scratch = Scratch::new("git")?;
    let auth = GitAuth {
        username: repo.credentials.as_ref().map(|c| c.username.as_str()),
        password: repo.credentials.as_ref().map(|c| c.password.as_str()),
        ssh_key: repo.ssh_key.as_deref(),
    };
    let mut git = Git::isolated(&scratch, &auth, local)?;
    for (k, v) in build.proxy.vars() {
        git = git.with_env(k, v);
    }
    let dest = scratch.path().join("checkout");
    let dest_s = dest.display().to_string();
    log.info(format!("{what}: cloning {shown}"));
    git.run(
        None,
        &[
            "-c",
            "credential.helper=",
            "clone",
            "--quiet",
            "--",
            &url,
            &dest_s,
        ],
        log,
    )
    .await
    .map_err(|e| {
        let kind = git_error_kind(&e.message);
        JobError::new(
            kind,
            format!("{what}: cloning {shown} failed: {}", e.message),
            kind == "git",
        )
    })?;
    if let Some(commit) = &repo.commit_id {
        git.run(
            Some(&dest),
            &[
                "-c",
                "advice.detachedHead=false",
                "checkout",
                "--quiet",
                "--detach",
                commit,
                "--",
            ],
            log,
        )
        .await
        .map_err(|e| {
            JobError::new(
                "not_found",
                format!(
                    "{what}: commit_id {commit} is not in {shown}: {}",
                    e.message
                ),
                false,
            )
        })?;
    }
    let head = git
        .run(Some(&dest), &["rev-parse", "HEAD"], log)
        .await
        .map_err(|e| JobError::new("git", format!("{what}: {}", e.message), false))?;
    let count = tar.tree(&format!("workspace/{}", repo.name), &dest, true)?;
    log.info(format!(
        "{what}: {shown} at {head}: {count} files into {WORKSPACE}/{}",
        repo.name
    ));
    Ok(head)
    // `scratch` (clone, askpass, key) is removed here.
}

fn git_error_kind(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("authentication failed")
        || m.contains("could not read username")
        || m.contains("could not read password")
        || m.contains("permission denied")
        || m.contains("403")
        || m.contains("401")
    {
        "auth"
    } else if m.contains("not found")
        || m.contains("does not exist")
        || m.contains("not appear to be a git repository")
    {
        "not_found"
    } else {
        "git"
    }
}

/// Fetches one `files` entry into the context; returns its manifest record.
async fn add_file(
    ctx: &JobContext,
    log: &JobLog,
    entry: &file::FileEntry,
    build: &BuildFile,
    tar: &mut ContextTar,
) -> Result<serde_json::Value, JobError> {
    let path = format!("workspace/{}", entry.dest);
    let image_path = format!("{WORKSPACE}/{}", entry.dest);
    let cfg = &ctx.config.build;
    let (source, data) = match &entry.source {
        FileSource::Url(url) => {
            let shown = mask_url_credentials(url);
            log.info(format!("files: downloading {shown} to {image_path}"));
            let data = fetch::download(
                url,
                &build.proxy,
                std::time::Duration::from_secs(cfg.fetch_timeout_s),
                cfg.max_file_bytes,
            )
            .await?;
            (shown, data)
        }
        FileSource::Local(p) => {
            let real = fetch::allowed_local_path(std::path::Path::new(p), &cfg.files_allow)?;
            if real.is_dir() {
                log.info(format!(
                    "files: copying the directory {} to {image_path}",
                    real.display()
                ));
                let count = tar.tree(&path, &real, false)?;
                return Ok(json!({"path": image_path, "source": p, "files": count}));
            }
            log.info(format!("files: copying {} to {image_path}", real.display()));
            let meta = std::fs::metadata(&real)
                .map_err(|e| JobError::new("invalid_job", format!("{p}: {e}"), false))?;
            if meta.len() > cfg.max_file_bytes {
                return Err(JobError::new(
                    "invalid_job",
                    format!(
                        "{p} is larger than the limit of {} bytes (build.max_file_bytes)",
                        cfg.max_file_bytes
                    ),
                    false,
                ));
            }
            let data = std::fs::read(&real)
                .map_err(|e| JobError::new("invalid_job", format!("{p}: {e}"), false))?;
            (p.clone(), data)
        }
    };
    let digest = Sha256::digest(&data);
    let sha256: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    tar.file(&path, &data, false)?;
    let mut record = BTreeMap::new();
    record.insert("path", json!(image_path));
    record.insert("source", json!(source));
    record.insert("size", json!(data.len()));
    record.insert("sha256", json!(sha256));
    Ok(json!(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security: whatever the values, the Dockerfile has exactly the instructions the worker
    /// writes, one a line, and each value sits inside its quotes.
    #[test]
    fn values_never_become_instructions() {
        let build = file::parse(
            r#"
env:
  A: 'x" RUN touch /pwned \'
  B: "${WORKSPACE}/lib"
packages: ['pkg ; RUN touch /pwned', '--no-index']
cmds:
  pre: 'echo "]" \'
  post: 'RUN echo done", "x'
files:
  - {'COPY . x': 'https://h/f'}
"#,
            1 << 20,
        )
        .unwrap();
        let d = dockerfile("base:1", &build, true);
        let instructions: Vec<&str> = d
            .lines()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(
            instructions,
            [
                "FROM", "ENV", "RUN", "WORKDIR", "ENV", "ENV", "COPY", "RUN", "RUN", "RUN"
            ]
        );
        assert!(d.contains(r#"ENV A="x\" RUN touch /pwned \\""#), "{d}");
        assert!(d.contains(r#"ENV B="${WORKSPACE}/lib""#), "{d}");
        assert!(
            d.contains(r#"RUN ["/bin/sh", "-c", "echo \"]\" \\"]"#),
            "{d}"
        );
        assert!(
            d.contains(r#"RUN ["/bin/sh", "-c", "echo done\", \"x"]"#),
            "{d}"
        );
        // Packages and file names are never Dockerfile text.
        assert!(!d.contains("pkg ;") && !d.contains("COPY . x"), "{d}");
        for line in d.lines().filter(|l| l.starts_with("RUN [")) {
            let args: Vec<String> = serde_json::from_str(&line[4..]).unwrap();
            assert!(!args.is_empty());
        }
    }
}
