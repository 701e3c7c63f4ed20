//! Fixtures of the build tests: git repositories made with the real git CLI, a tiny wheel, and
//! a small HTTP server on 127.0.0.1 (files, and git's "dumb" HTTP protocol behind basic auth).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The base image the build tests build FROM (scripts/base-image.sh makes it).
pub const BASE_TEMPLATE: &str = "127.0.0.1:5000/base/python:{python}-slim";

/// Runs git with a fixed identity; panics with its output on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=tests",
            "-c",
            "user.email=tests@localhost",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git CLI");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A work tree with `files` committed, pushed to a new bare repository `bare`; returns the
/// commit. Later calls on the same `work` add commits (on `branch`).
pub fn commit_files(
    work: &Path,
    bare: &Path,
    branch: &str,
    files: &[(&str, &str)],
    message: &str,
) -> String {
    if !work.join(".git").exists() {
        std::fs::create_dir_all(work).unwrap();
        git(work, &["init", "-q"]);
    }
    if !bare.exists() {
        std::fs::create_dir_all(bare).unwrap();
        git(bare, &["init", "-q", "--bare"]);
    }
    let current = git(work, &["branch", "--show-current"]);
    let exists = !git(work, &["branch", "--list", branch]).is_empty();
    if current != branch {
        if exists {
            git(work, &["checkout", "-q", branch]);
        } else {
            git(work, &["checkout", "-q", "-b", branch]);
        }
    }
    for (path, text) in files {
        let p = work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", message]);
    let bare_s = bare.display().to_string();
    git(work, &["push", "-q", &bare_s, branch]);
    git(work, &["rev-parse", "HEAD"])
}

/// A pure-Python wheel `iwdemo-1.0-py3-none-any.whl` whose module has `VALUE = value`.
pub fn make_wheel(dir: &Path, value: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let script = r#"
import base64, hashlib, sys, zipfile
out, value = sys.argv[1], sys.argv[2]
files = {
    "iwdemo/__init__.py": "VALUE = %r\n" % value,
    "iwdemo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: iwdemo\nVersion: 1.0\n",
    "iwdemo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(out, "w") as z:
    for name, text in files.items():
        data = text.encode()
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (name, digest, len(data)))
    record.append("iwdemo-1.0.dist-info/RECORD,,")
    z.writestr("iwdemo-1.0.dist-info/RECORD", "\n".join(record) + "\n")
"#;
    let wheel = dir.join("iwdemo-1.0-py3-none-any.whl");
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(value)
        .status()
        .expect("python3");
    assert!(status.success());
    wheel
}

fn base64(input: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A static file server on 127.0.0.1 over `root`. Paths under `/private/` need basic auth with
/// `credentials`. Records every request path with whether it carried valid credentials.
pub struct FileServer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<(String, bool)>>>,
}

impl FileServer {
    pub async fn start(root: PathBuf, credentials: Option<(&str, &str)>) -> FileServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let expected =
            credentials.map(|(u, p)| format!("Basic {}", base64(format!("{u}:{p}").as_bytes())));
        let seen = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let root = root.clone();
                let expected = expected.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let target = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let path = target.split('?').next().unwrap_or("/").to_string();
                    let headers: HashMap<String, String> = text
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let authorized = expected
                        .as_ref()
                        .is_some_and(|e| headers.get("authorization") == Some(e));
                    seen.lock().unwrap().push((path.clone(), authorized));
                    let response = if path.starts_with("/private/") && !authorized {
                        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"tests\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
                    } else {
                        let rel = path.trim_start_matches('/');
                        let file = root.join(rel);
                        match (rel.contains(".."), std::fs::read(&file)) {
                            (false, Ok(body)) => {
                                let mut r = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                    body.len()
                                )
                                .into_bytes();
                                r.extend_from_slice(&body);
                                r
                            }
                            _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                        }
                    };
                    let _ = stream.write_all(&response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        FileServer { port, requests }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(super::unique(label));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The YAML of a worker config for build tests; `extra` holds more `build:` keys, indented.
pub fn build_worker_yaml(files_allow: &[&Path], extra: &str) -> String {
    let allow: Vec<String> = files_allow
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    format!(
        "build:\n  base_image_template: \"{BASE_TEMPLATE}\"\n  files_allow: [{}]\n{extra}",
        allow.join(", ")
    )
}

/// Runs `docker run --rm IMAGE args...` and returns stdout.
pub fn docker_run(image: &str, args: &[&str]) -> String {
    let mut all = vec!["run", "--rm", "--network", "none", image];
    all.extend_from_slice(args);
    super::docker(&all)
}
