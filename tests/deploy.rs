//! The Kubernetes manifests in `deploy/kubernetes/`: they parse, they fit together (probes, ports,
//! mounts, secrets, grace period) and the worker accepts the configuration they give it.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use image_worker::config::{Config, ENV_PREFIX, WorkerConfig};
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    common::repo_root().join("deploy/kubernetes")
}

/// Every document of every `.yaml` file, by file name.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let yaml = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
            if yaml.is_null() {
                continue;
            }
            let json: Value = serde_json::to_value(yaml)
                .unwrap_or_else(|e| panic!("{name}: not JSON-compatible: {e}"));
            docs.push((name.clone(), json));
        }
    }
    docs
}

fn one_of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found[0]
}

struct Manifests {
    deployment: Value,
    config_map: Value,
    secret: Value,
}

impl Manifests {
    fn load() -> Self {
        let docs = documents();
        Self {
            deployment: one_of_kind(&docs, "Deployment").clone(),
            config_map: one_of_kind(&docs, "ConfigMap").clone(),
            secret: one_of_kind(&docs, "Secret").clone(),
        }
    }

    fn pod(&self) -> &Value {
        &self.deployment["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        let containers = self.pod()["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "one container");
        &containers[0]
    }

    /// `(mountPath, volume)` of every mount of the container.
    fn mounts(&self) -> Vec<(String, Value)> {
        let volumes = self.pod()["volumes"].as_array().unwrap();
        self.container()["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let volume = volumes
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .unwrap_or_else(|| panic!("mount {} has no volume", m["name"]));
                (m["mountPath"].as_str().unwrap().to_string(), volume.clone())
            })
            .collect()
    }

    /// The container's environment, secret references resolved against the Secret's
    /// (placeholder) values.
    fn env(&self) -> Vec<(String, String)> {
        let secret_name = self.secret["metadata"]["name"].as_str().unwrap();
        self.container()["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let name = e["name"].as_str().unwrap().to_string();
                let value = if let Some(v) = e["value"].as_str() {
                    v.to_string()
                } else {
                    let r = &e["valueFrom"]["secretKeyRef"];
                    assert_eq!(r["name"], secret_name, "{name} refers to another Secret");
                    let key = r["key"].as_str().unwrap();
                    self.secret["stringData"][key]
                        .as_str()
                        .unwrap_or_else(|| panic!("{name}: the Secret has no key {key}"))
                        .to_string()
                };
                (name, value)
            })
            .collect()
    }

    /// The config file's path from `--config`, and its text from the ConfigMap mounted there.
    fn config_file(&self) -> (String, String) {
        let args: Vec<&str> = self.container()["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args
            .iter()
            .position(|a| *a == "--config")
            .expect("--config");
        let path = args[at + 1].to_string();
        let (dir, file) = path.rsplit_once('/').unwrap();
        let (_, volume) = self
            .mounts()
            .into_iter()
            .find(|(m, _)| m == dir)
            .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
        assert_eq!(
            volume["configMap"]["name"], self.config_map["metadata"]["name"],
            "{dir} is not the ConfigMap"
        );
        let text = self.config_map["data"][file]
            .as_str()
            .unwrap_or_else(|| panic!("the ConfigMap has no {file}"))
            .to_string();
        (path, text)
    }

    /// The configuration the worker runs with in the pod: the ConfigMap's file plus the env.
    fn effective_config(&self) -> Config {
        let (_, text) = self.config_file();
        Config::from_yaml_and_env(&text, self.env())
            .unwrap_or_else(|e| panic!("the pod's configuration is refused: {e}"))
    }
}

#[test]
fn every_document_parses_with_the_expected_kinds() {
    let docs = documents();
    let mut kinds: Vec<&str> = docs
        .iter()
        .map(|(_, d)| d["kind"].as_str().unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["ConfigMap", "Deployment", "Kustomization", "Secret"]
    );
    for (file, doc) in &docs {
        assert!(doc["apiVersion"].is_string(), "{file}: no apiVersion");
    }
    // The kustomization applies every other file.
    let kustomization = one_of_kind(&docs, "Kustomization");
    let mut resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    resources.sort();
    let mut others: Vec<&str> = docs
        .iter()
        .filter(|(_, d)| d["kind"] != "Kustomization")
        .map(|(f, _)| f.as_str())
        .collect();
    others.sort();
    others.dedup();
    assert_eq!(resources, others);
    // The Deployment's selector picks its own pods.
    let m = Manifests::load();
    let selector = &m.deployment["spec"]["selector"]["matchLabels"];
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(
            &m.deployment["spec"]["template"]["metadata"]["labels"][k],
            v
        );
    }
}

#[test]
fn the_config_map_is_a_valid_worker_config() {
    let m = Manifests::load();
    let (path, text) = m.config_file();
    assert_eq!(path, "/etc/image-worker/image-worker.yaml");
    // Valid alone, and with the pod's environment.
    let alone = Config::from_yaml_and_env(&text, Vec::new()).unwrap();
    let config = m.effective_config();
    assert_eq!(alone.worker.group, config.worker.group);
    // The AMQP URL comes from the Secret, through the environment.
    assert_eq!(
        config.amqp_url().unwrap(),
        m.secret["stringData"]["amqp-url"].as_str().unwrap()
    );
    assert!(
        !text.contains("amqp://"),
        "no broker URL (with its password) in the ConfigMap"
    );
    // The pod does not see the engine's layer directories: discovery reads the archive stream.
    assert_eq!(config.discovery.source.as_str(), "archive");
    assert_eq!(
        config.docker.host.as_deref(),
        Some("unix:///var/run/docker.sock")
    );
}

#[test]
fn probes_reach_the_http_endpoint() {
    let m = Manifests::load();
    let config = m.effective_config();
    let (host, port) = config.http.listen.rsplit_once(':').unwrap();
    assert_eq!(
        host, "0.0.0.0",
        "probes come from the kubelet, not loopback"
    );
    let port: u64 = port.parse().unwrap();
    let c = m.container();
    let ports = c["ports"].as_array().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["containerPort"] == port && p["name"] == "http"),
        "{ports:?}"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], port, "{probe}");
    }
    let annotations = &m.deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    // The container logs JSON lines.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    let at = args.iter().position(|a| *a == "--log-format").unwrap();
    assert_eq!(args[at + 1], "json");
}

#[test]
fn grace_period_outlasts_the_worker_s() {
    let m = Manifests::load();
    let grace = m.pod()["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > WorkerConfig::default().shutdown_grace_s);
    assert!(grace > m.effective_config().worker.shutdown_grace_s);
}

/// Does `path` (lowercased segments) name a key of the configuration?
fn is_config_key(defaults: &Value, segments: &[String]) -> bool {
    let mut node = defaults;
    for (i, s) in segments.iter().enumerate() {
        match node.get(s.as_str()) {
            Some(next) => node = next,
            // Credentials are a map by registry host: any host, then a Credentials key.
            None if i > 0 && segments[i - 1] == "credentials" => {
                let c = serde_json::to_value(image_worker::config::Credentials::default()).unwrap();
                return is_config_key(&c, &segments[i + 1..]);
            }
            None => return false,
        }
    }
    true
}

#[test]
fn environment_names_are_config_keys() {
    let m = Manifests::load();
    let defaults = serde_json::to_value(Config::default()).unwrap();
    let env = m.env();
    let overrides: Vec<&String> = env
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(ENV_PREFIX))
        .collect();
    assert!(overrides.len() >= 2, "{overrides:?}");
    for name in &overrides {
        let segments: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        assert!(
            is_config_key(&defaults, &segments),
            "{name} is not a configuration key"
        );
    }
    for required in ["IMAGE_WORKER__HTTP__LISTEN", "IMAGE_WORKER__AMQP__URL"] {
        assert!(overrides.iter().any(|k| *k == required), "{required}");
    }
    // Anything else is a variable the binary reads itself.
    for (name, _) in &env {
        assert!(
            name.starts_with(ENV_PREFIX)
                || ["RUST_LOG", "IMAGE_WORKER_LOG_FORMAT"].contains(&name.as_str()),
            "{name} is read by nothing"
        );
    }
    // A misspelt key is refused, so the check above has teeth.
    let defaults_flat = is_config_key(&defaults, &["http".into(), "listne".into()]);
    assert!(!defaults_flat);
}

#[test]
fn mounts_secrets_and_socket() {
    let m = Manifests::load();
    let config = m.effective_config();
    let mounts: BTreeMap<String, Value> = m.mounts().into_iter().collect();
    // The engine's socket from the node.
    let socket = &mounts["/var/run/docker.sock"];
    assert_eq!(socket["hostPath"]["path"], "/var/run/docker.sock");
    assert_eq!(socket["hostPath"]["type"], "Socket");
    // Registry passwords are files from the Secret.
    let secret_name = &m.secret["metadata"]["name"];
    let mut password_files = 0;
    for (host, credentials) in &config.registry.credentials {
        let Some(file) = &credentials.password_file else {
            assert!(
                credentials.password.is_none(),
                "{host}: password in the ConfigMap"
            );
            continue;
        };
        let file = file.to_string_lossy();
        let (dir, name) = file.rsplit_once('/').unwrap();
        let volume = &mounts
            .get(dir)
            .unwrap_or_else(|| panic!("{host}: nothing mounted at {dir}"))["secret"];
        assert_eq!(&volume["secretName"], secret_name);
        let items = volume["items"].as_array().unwrap();
        let item = items
            .iter()
            .find(|i| i["path"] == name)
            .unwrap_or_else(|| panic!("{host}: {name} is not projected"));
        let key = item["key"].as_str().unwrap();
        assert!(m.secret["stringData"][key].is_string(), "{key}");
        // Readable by the pod's group (fsGroup), by nobody else.
        assert_eq!(volume["defaultMode"].as_u64(), Some(0o440));
        password_files += 1;
    }
    assert!(password_files >= 1);
    // The root filesystem is read-only: the logs root and /tmp are volumes.
    let logs_root = config.logs.root.to_string_lossy().to_string();
    assert!(
        mounts.contains_key(&logs_root),
        "{logs_root} is not a volume"
    );
    assert!(mounts.contains_key("/tmp"));
    // The config and secrets are mounted read-only.
    let c = m.container();
    for mount in c["volumeMounts"].as_array().unwrap() {
        if ["/etc/image-worker", "/run/secrets/image-worker"]
            .contains(&mount["mountPath"].as_str().unwrap())
        {
            assert_eq!(mount["readOnly"], true, "{mount}");
        }
    }
}

#[test]
fn security_context_and_resources() {
    let m = Manifests::load();
    let pod = m.pod();
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert!(psc["runAsUser"].as_u64().unwrap() > 0);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(
        !psc["supplementalGroups"].as_array().unwrap().is_empty(),
        "the docker socket's group"
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    let c = m.container();
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(sc["capabilities"].get("add").is_none());
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "resources.{kind}.{resource}"
            );
        }
    }
    assert_eq!(c["image"], "image-worker:latest");
}

#[test]
fn manifests_pass_strict_schema_validation() {
    // kubernetes-validate (PyPI, schemas bundled) with unknown fields refused.
    let files: Vec<PathBuf> = ["configmap.yaml", "secret.yaml", "deployment.yaml"]
        .iter()
        .map(|f| deploy_dir().join(f))
        .collect();
    let out = std::process::Command::new("bash")
        .arg(common::repo_root().join("scripts/validate-k8s.sh"))
        .args(&files)
        .output()
        .expect("run scripts/validate-k8s.sh");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches(" passed for resource ").count(), 3, "{said}");
}
