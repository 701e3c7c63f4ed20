//! Build jobs end to end: a real worker process, RabbitMQ, the Docker engine (legacy builder),
//! the registries, git, and pip installing a wheel the test makes (no internet).

mod common;

use std::path::Path;
use std::time::Duration;

use common::builds::*;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(600);

fn build_job(name: &str, push_url: &str, yaml: &str) -> Value {
    json!({
        "uuid": new_uuid(),
        "type": "build",
        "group": "builders",
        "name": name,
        "tag": "1.0",
        "push_url": push_url,
        "yaml_content": yaml,
        "submitter": "tests",
    })
}

async fn run_build(broker: &mut Broker, job: &Value) -> Value {
    broker.publish_job(job).await;
    broker.wait_reply(job["uuid"].as_str().unwrap(), WAIT).await
}

fn job_log(report: &Value) -> String {
    let dir = Path::new(report["logs_dir"].as_str().unwrap());
    std::fs::read_to_string(dir.join("job.log")).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// A repository of pyATS jobs, served from the allow-listed directory via file://.
fn jobs_repository(allowed: &Path) -> (std::path::PathBuf, String) {
    let bare = allowed.join("jobs.git");
    let commit = commit_files(
        &allowed.join("jobs-work"),
        &bare,
        "main",
        &[
            ("suite/demo_job.py", "def main(runtime):\n    pass\n"),
            (
                "extra/runner.py",
                "import os\n\ndef main(runtime):\n    pass\n",
            ),
            ("extra/helper.py", "VALUE = 1\n"),
        ],
        "jobs",
    );
    (bare, commit)
}

/// An `env` value full of what a Dockerfile would expand or unescape (YAML single-quoted).
const RAW_ENV: &str = r#"$(id) ${PATH} $HOME "q" \ \$x \\ end\"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_job_over_amqp_installs_a_wheel_pushes_and_discovers() {
    let dir = temp_dir("iw-build");
    let allowed = dir.join("allowed");
    let (bare, commit) = jobs_repository(&allowed);
    // A second commit: the job pins the first one.
    commit_files(
        &allowed.join("jobs-work"),
        &bare,
        "main",
        &[("suite/late_job.py", "def main():\n    pass\n")],
        "later",
    );
    let served = dir.join("served");
    let marker = unique("wheel-value");
    make_wheel(&served, &marker);
    let server = FileServer::start(served.clone(), None).await;
    let worker = Worker::start(WorkerOptions {
        extra_yaml: build_worker_yaml(&[&allowed], ""),
        ..Default::default()
    });
    let mut broker = Broker::connect(&worker.prefix).await;

    let yaml = format!(
        r#"python: "3.11"
env:
  IW_GREETING: 'hello "builder"'
  IW_LIB: ${{WORKSPACE}}/lib
  IW_RAW: '{raw_env}'
files:
  - wheels/iwdemo-1.0-py3-none-any.whl: {wheel_url}
packages:
  - --no-index
  - ${{WORKSPACE}}/wheels/iwdemo-1.0-py3-none-any.whl
repositories:
  tests:
    url: file://{bare}
    commit_id: {commit}
jobfiles:
  glob: ['/pyats/tests/extra/run*.py']
tag: ignored:latest
"#,
        raw_env = RAW_ENV,
        wheel_url = server.url("iwdemo-1.0-py3-none-any.whl"),
        bare = bare.display(),
    );
    let name = unique("builds/custom");
    let mut job = build_job(&name, AUTH_REGISTRY, &yaml);
    job["username"] = json!(REG_USER);
    job["password"] = json!(REG_PASS);
    let report = run_build(&mut broker, &job).await;
    let log = job_log(&report);

    assert_eq!(report["status"], "successful", "{report:#}\n{log}");
    assert_eq!(report["type"], "pyats");
    assert_eq!(report["custom"], true);
    assert_eq!(report["job_type"], "build");
    assert_eq!(report["push_url"], AUTH_REGISTRY);
    assert_eq!(
        report["image"],
        format!("{AUTH_REGISTRY}/{name}:1.0").as_str()
    );
    assert_eq!(report["yaml_content"], yaml.as_str());
    assert_eq!(report["data"]["password"], "********");
    assert_seed_shape(&report);
    let digest = report["digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert!(report["size"].as_i64().unwrap() > 0);
    assert!(log.contains("build: Step 1/"), "{log}");
    assert!(log.contains("Successfully installed iwdemo-1.0"), "{log}");

    // Pulled back by digest from the auth registry: the same image.
    let config = dir.join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    let config_s = config.display().to_string();
    let login = std::process::Command::new("docker")
        .args([
            "--config",
            &config_s,
            "login",
            "-u",
            REG_USER,
            "--password-stdin",
            AUTH_REGISTRY,
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(REG_PASS.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(login.success());
    let by_digest = format!("{AUTH_REGISTRY}/{name}@{digest}");
    docker(&["image", "rm", "-f", &format!("{AUTH_REGISTRY}/{name}:1.0")]);
    docker(&["--config", &config_s, "pull", "-q", &by_digest]);
    assert_eq!(image_id(&by_digest), report["image_id"].as_str().unwrap());

    // The wheel is installed and importable; the environment is exact.
    assert_eq!(
        docker_run(
            &by_digest,
            &["python3", "-c", "import iwdemo; print(iwdemo.VALUE)"]
        ),
        marker
    );
    assert_eq!(
        docker_run(
            &by_digest,
            &["sh", "-c", "printf %s \"$IW_GREETING|$IW_LIB|$WORKSPACE\""]
        ),
        "hello \"builder\"|/pyats/lib|/pyats"
    );
    // Dockerfile syntax in a value is not expanded: the image holds it byte for byte.
    let env: Vec<String> = serde_json::from_str(&docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Env}}",
        &by_digest,
    ]))
    .unwrap();
    assert!(env.contains(&format!("IW_RAW={RAW_ENV}")), "{env:?}");
    // The repository at the pinned commit, without its .git.
    let listing = docker_run(
        &by_digest,
        &["sh", "-c", "cd /pyats/tests && find . -type f | sort"],
    );
    assert_eq!(
        listing,
        "./extra/helper.py\n./extra/runner.py\n./suite/demo_job.py"
    );

    // Installation records.
    let requirements = docker_run(&by_digest, &["cat", "/pyats/installation/requirements.txt"]);
    assert_eq!(
        requirements,
        "--no-index\n${WORKSPACE}/wheels/iwdemo-1.0-py3-none-any.whl"
    );
    let manifest: Value = serde_json::from_str(&docker_run(
        &by_digest,
        &["cat", "/pyats/installation/manifest.json"],
    ))
    .unwrap();
    assert_eq!(manifest["repositories"][0]["commit"], commit.as_str());
    assert_eq!(manifest["repositories"][0]["path"], "/pyats/tests");
    assert_eq!(
        manifest["base_image"],
        "127.0.0.1:5000/base/python:3.11-slim"
    );
    assert_eq!(
        manifest["files"][0]["path"],
        "/pyats/wheels/iwdemo-1.0-py3-none-any.whl"
    );
    assert_eq!(manifest["files"][0]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        manifest["jobfiles"]["glob"],
        json!(["/pyats/tests/extra/run*.py"])
    );
    let dockerfile = docker_run(&by_digest, &["cat", "/pyats/installation/Dockerfile"]);
    assert!(
        dockerfile.starts_with("FROM 127.0.0.1:5000/base/python:3.11-slim\n"),
        "{dockerfile}"
    );

    // Events: building, pushing, discovering, then job.build.successful.
    broker.drain_events(Duration::from_millis(500)).await;
    let phases: Vec<String> = broker
        .seen
        .iter()
        .filter(|(k, _)| k == "job.build.running")
        .map(|(_, b)| {
            serde_json::from_slice::<Value>(b).unwrap()["phase"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for phase in ["building", "pushing", "discovering"] {
        assert!(phases.contains(&phase.to_string()), "{phases:?}");
    }
    assert!(
        broker
            .seen_keys()
            .contains(&"job.build.successful".to_string())
    );

    // Discovery: the repository's job file (default match) and the build file's glob rule.
    assert_eq!(
        strings(&report["jobs"]),
        vec![
            "/pyats/tests/extra/runner.py",
            "/pyats/tests/suite/demo_job.py"
        ],
        "{report:#}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_builds_fail_with_the_last_output_lines() {
    let worker = Worker::start(WorkerOptions {
        extra_yaml: build_worker_yaml(&[], "  error_tail_lines: 6\n"),
        ..Default::default()
    });
    let mut broker = Broker::connect(&worker.prefix).await;

    let missing = build_job(
        &unique("builds/broken"),
        OPEN_REGISTRY,
        "packages: ['--no-index', 'iw-no-such-package==9.9']\n",
    );
    let report = run_build(&mut broker, &missing).await;
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_eq!(report["error"]["kind"], "build");
    assert_eq!(report["error"]["retryable"], false);
    let message = report["error"]["message"].as_str().unwrap();
    assert!(message.contains("returned a non-zero code: 1"), "{message}");
    assert!(message.contains("last build output:"), "{message}");
    assert!(
        message.contains("No matching distribution found for iw-no-such-package==9.9"),
        "{message}"
    );
    let log = job_log(&report);
    assert!(log.contains("build: Step 1/"), "{log}");
    assert!(
        log.contains("No matching distribution found for iw-no-such-package==9.9"),
        "{log}"
    );
    assert!(log.contains("job failed (build)"), "{log}");
    assert_eq!(report["digest"], Value::Null);

    let post = build_job(
        &unique("builds/broken"),
        OPEN_REGISTRY,
        "cmds:\n  post: 'echo iw-post-marker-line; exit 3'\n",
    );
    let report = run_build(&mut broker, &post).await;
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_eq!(report["error"]["kind"], "build");
    let message = report["error"]["message"].as_str().unwrap();
    assert!(message.contains("returned a non-zero code: 3"), "{message}");
    assert!(message.contains("iw-post-marker-line"), "{message}");
    // The message holds the tail; the log holds everything from step 1.
    assert!(!message.contains("Step 1/"), "{message}");
    let log = job_log(&report);
    assert!(
        log.contains("Step 1/") && log.contains("iw-post-marker-line"),
        "{log}"
    );

    // 6 MB of output on one line: the report stays small, the lines say they were cut.
    let flood = build_job(
        &unique("builds/broken"),
        OPEN_REGISTRY,
        "cmds:\n  post: 'head -c 6000000 /dev/zero | tr \"\\0\" x; echo; echo iw-after-flood; exit 4'\n",
    );
    let report = run_build(&mut broker, &flood).await;
    assert_eq!(report["status"], "failed", "{}", report["error"]);
    assert_eq!(report["error"]["kind"], "build");
    let size = report.to_string().len();
    assert!(size < 200 * 1024, "the report is {size} bytes");
    let message = report["error"]["message"].as_str().unwrap();
    assert!(message.len() <= 16 * 1024, "{}", message.len());
    assert!(message.contains("returned a non-zero code: 4"), "{message}");
    assert!(message.contains("iw-after-flood"), "{message}");
    assert!(
        message.contains("[line truncated: 5991808 of 6000000 bytes left out]"),
        "{message}"
    );
    let logs = report["logs"].as_str().unwrap();
    assert!(logs.len() <= 65 * 1024, "{}", logs.len());
    let log = job_log(&report);
    assert!(log.len() < 1024 * 1024, "job.log is {} bytes", log.len());
    assert!(
        // The logged line is "build: " and the output line.
        log.contains("INFO build: xxx")
            && log.contains("xxx [line truncated: 5991815 of 6000007 bytes left out]"),
        "{}",
        &log[..log.len().min(2000)]
    );
}

/// Security: no value of a build file adds a Dockerfile instruction. Line breaks are refused;
/// quotes and backslashes stay inside their value (checked in the image's history and config).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_values_cannot_add_dockerfile_instructions() {
    let worker = Worker::start(WorkerOptions {
        extra_yaml: build_worker_yaml(&[], ""),
        ..Default::default()
    });
    let mut broker = Broker::connect(&worker.prefix).await;

    for (yaml, field) in [
        ("packages: [\"x\\nRUN touch /pwned\"]\n", "packages[0]"),
        ("env: {A: \"x\\nRUN touch /pwned\"}\n", "env.A"),
        (
            "files: [{\"a\\nRUN touch /pwned\": \"http://127.0.0.1:9/f\"}]\n",
            "files[0]",
        ),
        (
            "repositories: {\"r\\nRUN touch /pwned\": {url: \"http://127.0.0.1:9/r.git\"}}\n",
            "repositories",
        ),
    ] {
        let report = run_build(
            &mut broker,
            &build_job(&unique("builds/inject"), OPEN_REGISTRY, yaml),
        )
        .await;
        assert_eq!(report["status"], "failed", "{yaml}: {report:#}");
        assert_eq!(report["error"]["kind"], "invalid_job", "{yaml}");
        let message = report["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field) && message.contains("line break"),
            "{yaml}: {message}"
        );
    }

    let yaml = r#"env:
  IW_TRICK: 'a" \'
  IW_AFTER: 'RUN touch /pwned'
cmds:
  pre: 'echo "]" > /tmp/pre.txt \'
  post: 'echo ok", "RUN touch /pwned'
"#;
    let name = unique("builds/inject");
    let report = run_build(&mut broker, &build_job(&name, OPEN_REGISTRY, yaml)).await;
    assert_eq!(report["status"], "successful", "{report:#}");
    let image = format!("{OPEN_REGISTRY}/{name}:1.0");
    // The image's own steps: exactly the worker's instructions over the base image.
    let created_by =
        |image: &str| docker(&["history", "--no-trunc", "--format", "{{.CreatedBy}}", image]);
    let base_steps = created_by("127.0.0.1:5000/base/python:3.11-slim")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let history = created_by(&image);
    let steps: Vec<&str> = history.lines().filter(|l| !l.trim().is_empty()).collect();
    // ENV, RUN venv, WORKDIR, ENV, ENV, COPY, RUN pre, RUN post.
    assert_eq!(steps.len() - base_steps, 8, "{history}");
    assert_eq!(steps[0], "/bin/sh -c echo ok\", \"RUN touch /pwned");
    assert_eq!(steps[3], "/bin/sh -c #(nop)  ENV IW_AFTER=RUN touch /pwned");
    assert!(!history.contains("/bin/sh -c #(nop)  RUN"), "{history}");
    assert_eq!(
        docker_run(&image, &["sh", "-c", "printf %s \"$IW_TRICK\""]),
        "a\" \\"
    );
    assert_eq!(
        docker_run(&image, &["sh", "-c", "printf %s \"$IW_AFTER\""]),
        "RUN touch /pwned"
    );
    assert_eq!(
        docker_run(
            &image,
            &["sh", "-c", "test -e /pwned && echo yes || echo no"]
        ),
        "no"
    );
}

/// Security: `files` never copies from the worker host outside build.files_allow (paths,
/// symlinks, `..`, file:// repositories), and a symlink inside it enters as a link, unfollowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_never_come_from_outside_the_allow_list() {
    let dir = temp_dir("iw-allow");
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(allowed.join("tree")).unwrap();
    std::fs::write(dir.join("host-secret.txt"), "iw-host-secret-content").unwrap();
    std::fs::write(allowed.join("tree/ok.txt"), "allowed content").unwrap();
    std::os::unix::fs::symlink(dir.join("host-secret.txt"), allowed.join("tree/link.txt")).unwrap();
    std::os::unix::fs::symlink(dir.join("host-secret.txt"), allowed.join("direct-link.txt"))
        .unwrap();
    let outside_repo = dir.join("outside.git");
    commit_files(
        &dir.join("outside-work"),
        &outside_repo,
        "main",
        &[("a_job.py", "def main():\n    pass\n")],
        "x",
    );
    let worker = Worker::start(WorkerOptions {
        extra_yaml: build_worker_yaml(&[&allowed], ""),
        ..Default::default()
    });
    let mut broker = Broker::connect(&worker.prefix).await;

    for (yaml, want) in [
        (
            "files: [/etc/hostname]\n".to_string(),
            "outside the directories",
        ),
        (
            format!("files: [{}]\n", dir.join("host-secret.txt").display()),
            "outside the directories",
        ),
        (
            format!("files: [{}]\n", allowed.join("direct-link.txt").display()),
            "outside the directories",
        ),
        (
            format!("files: [{}/../host-secret.txt]\n", allowed.display()),
            "outside the directories",
        ),
        (
            "files: ['file:///etc/passwd']\n".to_string(),
            "file:// is not supported",
        ),
        (
            format!(
                "repositories: {{r: {{url: 'file://{}'}}}}\n",
                outside_repo.display()
            ),
            "outside the directories",
        ),
        (
            format!(
                "repositories: {{r: {{url: '{}'}}}}\n",
                outside_repo.display()
            ),
            "outside the directories",
        ),
    ] {
        let report = run_build(
            &mut broker,
            &build_job(&unique("builds/allow"), OPEN_REGISTRY, &yaml),
        )
        .await;
        assert_eq!(report["status"], "failed", "{yaml}: {report:#}");
        assert_eq!(report["error"]["kind"], "invalid_job", "{yaml}");
        let message = report["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{yaml}: {message}");
    }

    let name = unique("builds/allow");
    let yaml = format!("files:\n  - data: {}\n", allowed.join("tree").display());
    let report = run_build(&mut broker, &build_job(&name, OPEN_REGISTRY, &yaml)).await;
    assert_eq!(report["status"], "successful", "{report:#}");
    let image = format!("{OPEN_REGISTRY}/{name}:1.0");
    assert_eq!(
        docker_run(&image, &["cat", "/pyats/data/ok.txt"]),
        "allowed content"
    );
    assert_eq!(
        docker_run(&image, &["readlink", "/pyats/data/link.txt"]),
        dir.join("host-secret.txt").display().to_string()
    );
    assert_eq!(
        docker_run(
            &image,
            &[
                "sh",
                "-c",
                "cat /pyats/data/link.txt 2>/dev/null || echo dangling"
            ]
        ),
        "dangling"
    );
    let saved = std::process::Command::new("docker")
        .args(["save", &image])
        .output()
        .unwrap();
    assert!(saved.status.success());
    assert!(!contains(&saved.stdout, b"iw-host-secret-content"));

    // With an empty allow-list, no host path at all.
    let strict = Worker::start(WorkerOptions {
        extra_yaml: build_worker_yaml(&[], ""),
        ..Default::default()
    });
    let mut strict_broker = Broker::connect(&strict.prefix).await;
    let yaml = format!("files: [{}]\n", allowed.join("tree/ok.txt").display());
    let report = run_build(
        &mut strict_broker,
        &build_job(&unique("builds/allow"), OPEN_REGISTRY, &yaml),
    )
    .await;
    assert_eq!(report["error"]["kind"], "invalid_job", "{report:#}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("build.files_allow is empty")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Security: `cmds` are shell commands run with RUN; other instructions and line breaks are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmds_run_only_as_shell_commands() {
    let worker = Worker::start(WorkerOptions {
        extra_yaml: build_worker_yaml(&[], ""),
        ..Default::default()
    });
    let mut broker = Broker::connect(&worker.prefix).await;
    for (yaml, want) in [
        (
            "cmds: {pre: 'COPY / /host'}\n",
            "Dockerfile instruction COPY",
        ),
        (
            "cmds: {post: 'FROM scratch'}\n",
            "Dockerfile instruction FROM",
        ),
        (
            "cmds: {post: 'ADD http://x /y'}\n",
            "Dockerfile instruction ADD",
        ),
        ("cmds: {pre: \"true\\nCOPY / /host\"}\n", "line break"),
    ] {
        let report = run_build(
            &mut broker,
            &build_job(&unique("builds/cmds"), OPEN_REGISTRY, yaml),
        )
        .await;
        assert_eq!(report["error"]["kind"], "invalid_job", "{yaml}: {report:#}");
        let message = report["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{yaml}: {message}");
    }
    // The format's `RUN ...` form works, as a shell command.
    let name = unique("builds/cmds");
    let yaml =
        "cmds: {pre: 'RUN echo pre-ran > /tmp/pre', post: 'cat /tmp/pre > /pyats/post.txt'}\n";
    let report = run_build(&mut broker, &build_job(&name, OPEN_REGISTRY, yaml)).await;
    assert_eq!(report["status"], "successful", "{report:#}");
    assert_eq!(
        docker_run(
            &format!("{OPEN_REGISTRY}/{name}:1.0"),
            &["cat", "/pyats/post.txt"]
        ),
        "pre-ran"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Security: repository credentials and ssh keys reach git (the clone over HTTP needs them) but
/// no log, event, report, image layer or build history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_keys_never_leave_the_worker() {
    const USER: &str = "iw-git-robot";
    const PASSWORD: &str = "iw-git-Pa55-never-shown";
    const KEY_LINE: &str = "b3BlbnNzaC1rZXktdjEAAAAAIWNoZXNlY3JldGtleW1hdGVyaWFs";
    let dir = temp_dir("iw-creds");
    let served = dir.join("served");
    let bare = served.join("private/auth.git");
    commit_files(
        &dir.join("work"),
        &bare,
        "main",
        &[("private_job.py", "def main():\n    pass\n")],
        "x",
    );
    git(&bare, &["update-server-info"]);
    let server = FileServer::start(served, Some((USER, PASSWORD))).await;
    let allowed = dir.join("allowed");
    let (jobs_bare, _) = jobs_repository(&allowed);
    let worker = Worker::start(WorkerOptions {
        extra_yaml: build_worker_yaml(&[&allowed], ""),
        ..Default::default()
    });
    let mut broker = Broker::connect(&worker.prefix).await;
    let yaml = format!(
        "repositories:\n  auth:\n    url: {}\n    credentials:\n      username: {USER}\n      password: {PASSWORD}\n  keyed:\n    url: file://{}\n    ssh_key: |\n      -----BEGIN OPENSSH PRIVATE KEY-----\n      {KEY_LINE}\n      -----END OPENSSH PRIVATE KEY-----\ncmds:\n  post: 'env > /pyats/build-env.txt'\n",
        server.url("private/auth.git"),
        jobs_bare.display()
    );
    let name = unique("builds/creds");
    let report = run_build(&mut broker, &build_job(&name, OPEN_REGISTRY, &yaml)).await;
    assert_eq!(report["status"], "successful", "{report:#}");
    let image = format!("{OPEN_REGISTRY}/{name}:1.0");
    // The credentials were used: git authenticated, and the private repository is in the image.
    assert!(
        server
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|(p, ok)| p.starts_with("/private/") && *ok)
    );
    assert_eq!(
        docker_run(&image, &["cat", "/pyats/auth/private_job.py"]),
        "def main():\n    pass"
    );
    assert!(!docker_run(&image, &["sh", "-c", "ls -a /pyats/auth"]).contains(".git"));

    let secrets: [&[u8]; 3] = [PASSWORD.as_bytes(), KEY_LINE.as_bytes(), USER.as_bytes()];
    let report_text = report.to_string();
    let log = job_log(&report);
    broker.drain_events(Duration::from_millis(300)).await;
    let events: Vec<u8> = broker.seen.iter().flat_map(|(_, b)| b.clone()).collect();
    let history = docker(&["history", "--no-trunc", &image]);
    let inspect = docker(&["image", "inspect", &image]);
    let saved = std::process::Command::new("docker")
        .args(["save", &image])
        .output()
        .unwrap();
    assert!(saved.status.success() && saved.stdout.len() > 1000);
    for secret in secrets {
        let s = String::from_utf8_lossy(secret);
        assert!(!report_text.contains(&*s), "report holds {s}");
        assert!(!log.contains(&*s), "job.log holds {s}");
        assert!(!worker.log_text().contains(&*s), "worker log holds {s}");
        assert!(!contains(&events, secret), "events hold {s}");
        assert!(!history.contains(&*s), "history holds {s}");
        assert!(!inspect.contains(&*s), "image config holds {s}");
        assert!(
            !contains(&saved.stdout, secret),
            "the image's files hold {s}"
        );
    }
    assert!(
        report["yaml_content"]
            .as_str()
            .unwrap()
            .contains("password: ********")
    );
    // No scratch directory is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("image-worker-git-")
        })
        .filter(|e| {
            std::fs::read_dir(e.path()).map(|d| d.count()).unwrap_or(0) > 0
                && e.path().join("askpass.sh").exists()
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
