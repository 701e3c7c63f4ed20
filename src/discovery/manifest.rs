//! pyATS manifests (`.tem`, "Test Execution Manifest"): YAML with `version` and `type`, the
//! script's `arguments`, named `profiles` (each with `description`, `runtime` and `arguments`
//! that override the script's) and named `runtimes`. The job file is the same stem with `.py`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use serde_yaml::Value as Yaml;

/// The profile every manifest has: the script's own arguments, no runtime.
pub const DEFAULT_PROFILE: &str = "DEFAULT";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Absolute path of the `.tem` file in the image.
    pub file: String,
    /// The job it runs: the same path with `.py`.
    pub job_file: String,
    /// `name`, else the file stem.
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    /// The script arguments (a JSON object).
    pub arguments: Value,
    /// `DEFAULT` first, then the named profiles in file order.
    pub profiles: Vec<Profile>,
    /// The named runtimes (a JSON object, `{}` when none).
    pub runtimes: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Name of an entry of `runtimes`; none means the image's own environment.
    pub runtime: Option<String>,
    /// The arguments a run with this profile gets: the script's, overridden by the profile's.
    pub arguments: Value,
}

/// Parses a manifest's bytes; the error is the reason it is broken, for a warning.
pub fn parse_manifest(file: &str, bytes: &[u8]) -> Result<Manifest, String> {
    let doc: Yaml = serde_yaml::from_slice(bytes).map_err(|e| format!("invalid YAML: {e}"))?;
    let Yaml::Mapping(doc) = doc else {
        return Err("not a YAML mapping".into());
    };
    let get = |key: &str| doc.get(key).filter(|v| !v.is_null());
    get("version").ok_or("no `version`")?;
    match get("type") {
        None => return Err("no `type`".into()),
        Some(Yaml::String(_)) => {}
        Some(_) => return Err("`type` is not a string".into()),
    }
    let stem = file
        .rsplit('/')
        .next()
        .unwrap_or(file)
        .trim_end_matches(".tem");
    let name = optional_string(get("name"), "name")?.unwrap_or_else(|| stem.to_owned());
    let description = optional_string(get("description"), "description")?.unwrap_or_default();
    let tags = match get("tags") {
        None => Vec::new(),
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(scalar_text)
            .collect::<Option<_>>()
            .ok_or("`tags` holds a non-scalar")?,
        Some(v) => vec![scalar_text(v).ok_or("`tags` is not a list")?],
    };
    let arguments = mapping(get("arguments"), "arguments")?;
    let runtimes = mapping(get("runtimes"), "runtimes")?;
    let mut profiles = vec![Profile {
        name: DEFAULT_PROFILE.into(),
        description: String::new(),
        runtime: None,
        arguments: Value::Object(arguments.clone()),
    }];
    match get("profiles") {
        None => {}
        Some(Yaml::Mapping(named)) => {
            for (key, body) in named {
                let name = scalar_text(key).ok_or("a profile name is not a scalar")?;
                profiles.push(
                    profile(&name, body, &arguments).map_err(|e| format!("profile {name}: {e}"))?,
                );
            }
        }
        Some(_) => return Err("`profiles` is not a mapping".into()),
    }
    Ok(Manifest {
        file: file.to_owned(),
        job_file: format!("{}.py", file.strip_suffix(".tem").unwrap_or(file)),
        name,
        description,
        tags,
        arguments: Value::Object(arguments),
        profiles,
        runtimes: Value::Object(runtimes),
    })
}

fn profile(
    name: &str,
    body: &Yaml,
    script_arguments: &Map<String, Value>,
) -> Result<Profile, String> {
    let body = match body {
        Yaml::Null => &serde_yaml::Mapping::new(),
        Yaml::Mapping(m) => m,
        _ => return Err("not a mapping".into()),
    };
    let get = |key: &str| body.get(key).filter(|v| !v.is_null());
    let mut arguments = script_arguments.clone();
    arguments.extend(mapping(get("arguments"), "arguments")?);
    Ok(Profile {
        name: name.to_owned(),
        description: optional_string(get("description"), "description")?.unwrap_or_default(),
        runtime: optional_string(get("runtime"), "runtime")?,
        arguments: Value::Object(arguments),
    })
}

fn optional_string(value: Option<&Yaml>, key: &str) -> Result<Option<String>, String> {
    match value {
        None => Ok(None),
        Some(v) => scalar_text(v)
            .map(Some)
            .ok_or_else(|| format!("`{key}` is not a string")),
    }
}

fn mapping(value: Option<&Yaml>, key: &str) -> Result<Map<String, Value>, String> {
    match value.map(to_json) {
        None => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(format!("`{key}` is not a mapping")),
    }
}

/// A YAML scalar as text (`2` → "2"); `None` for collections.
fn scalar_text(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Bool(b) => Some(b.to_string()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Null => Some(String::new()),
        Yaml::Tagged(t) => scalar_text(&t.value),
        Yaml::Sequence(_) | Yaml::Mapping(_) => None,
    }
}

/// YAML to JSON: non-string keys become their text, tags are dropped, non-finite floats are text.
fn to_json(value: &Yaml) -> Value {
    match value {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(*b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into()
            } else if let Some(u) = n.as_u64() {
                u.into()
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or_else(|| Value::String(n.to_string()))
            }
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Sequence(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Mapping(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    (
                        scalar_text(k).unwrap_or_else(|| {
                            serde_yaml::to_string(k)
                                .unwrap_or_default()
                                .trim()
                                .to_owned()
                        }),
                        to_json(v),
                    )
                })
                .collect(),
        ),
        Yaml::Tagged(t) => to_json(&t.value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASIC: &str = "version: 1\ntype: easypy\nname: basic_example\ndescription: Basic example job\n\
        tags: [basic, example]\narguments:\n  testbed-file: /pyats/testbeds/basic.yaml\n  max-failures: 2\n\
        profiles:\n  sanity:\n    description: Quick sanity run\n    runtime: system\n    arguments:\n      max-failures: 0\n\
        runtimes:\n  system:\n    type: system\n";

    #[test]
    fn basic_manifest_with_default_profile() {
        let m =
            parse_manifest("/pyats/dest/basic/basic_example_job.tem", BASIC.as_bytes()).unwrap();
        assert_eq!(m.job_file, "/pyats/dest/basic/basic_example_job.py");
        assert_eq!(m.name, "basic_example");
        assert_eq!(m.description, "Basic example job");
        assert_eq!(m.tags, ["basic", "example"]);
        assert_eq!(
            m.arguments,
            json!({"testbed-file": "/pyats/testbeds/basic.yaml", "max-failures": 2})
        );
        assert_eq!(m.runtimes, json!({"system": {"type": "system"}}));
        assert_eq!(
            m.profiles,
            [
                Profile {
                    name: "DEFAULT".into(),
                    description: "".into(),
                    runtime: None,
                    arguments: m.arguments.clone()
                },
                Profile {
                    name: "sanity".into(),
                    description: "Quick sanity run".into(),
                    runtime: Some("system".into()),
                    arguments: json!({"testbed-file": "/pyats/testbeds/basic.yaml", "max-failures": 0}),
                },
            ]
        );
    }

    #[test]
    fn minimal_manifest_defaults() {
        let m = parse_manifest("/w/x_job.tem", b"version: 1\ntype: easypy\n").unwrap();
        assert_eq!(m.name, "x_job");
        assert_eq!(m.description, "");
        assert!(m.tags.is_empty());
        assert_eq!(m.arguments, json!({}));
        assert_eq!(m.runtimes, json!({}));
        assert_eq!(m.profiles.len(), 1);
        assert_eq!(m.profiles[0].name, "DEFAULT");
    }

    #[test]
    fn profile_order_and_odd_values() {
        let m = parse_manifest(
            "/w/j.tem",
            b"version: 1\ntype: easypy\ntags: single\narguments: {1: true, flag: .nan}\nprofiles:\n  zeta: {}\n  alpha:\n  mid: {arguments: {x: !custom 3}}\n",
        )
        .unwrap();
        assert_eq!(m.tags, ["single"]);
        assert_eq!(m.arguments, json!({"1": true, "flag": ".nan"}));
        let names: Vec<_> = m.profiles.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["DEFAULT", "zeta", "alpha", "mid"]);
        assert_eq!(m.profiles[3].arguments["x"], json!(3));
    }

    #[test]
    fn broken_manifests_say_why() {
        let err = |text: &str| parse_manifest("/w/j.tem", text.as_bytes()).unwrap_err();
        assert!(err("version: 1\ntype: [unclosed\n").starts_with("invalid YAML: "));
        assert_eq!(err("version: 1\nname: x\n"), "no `type`");
        assert_eq!(err("type: easypy\n"), "no `version`");
        assert_eq!(err("- a\n- b\n"), "not a YAML mapping");
        assert_eq!(err(""), "not a YAML mapping");
        assert_eq!(
            err("version: 1\ntype: easypy\narguments: [a]\n"),
            "`arguments` is not a mapping"
        );
        assert_eq!(
            err("version: 1\ntype: easypy\nprofiles: {p: 3}\n"),
            "profile p: not a mapping"
        );
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut bomb =
            String::from("version: 1\ntype: easypy\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        bomb.push_str("arguments: {boom: *a9}\n");
        let started = std::time::Instant::now();
        let err = parse_manifest("/w/bomb.tem", bomb.as_bytes()).unwrap_err();
        assert!(err.starts_with("invalid YAML: "), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
