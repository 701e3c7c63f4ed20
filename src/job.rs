//! Job messages: parsing and validation.
//!
//! Two outcomes besides a valid job, and the difference matters for "no lost job":
//! - [`Rejection`]: the message cannot be a job at all (not JSON, not an object, no valid uuid,
//!   unknown type, too large). Nobody can be told about it by uuid, so it goes to the dead-letter
//!   queue with the reason in `x-error`.
//! - [`InvalidJob`]: a job with a uuid and a known type whose other fields are wrong. Its sender
//!   waits for a report on that uuid, so it gets a `failed` report with `error.kind: invalid_job`.

use serde_json::{Map, Value};

use crate::reference;

/// The kinds of job this worker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    Pull,
    Build,
    PolarisBuild,
}

impl JobType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pull" => Some(Self::Pull),
            "build" => Some(Self::Build),
            "polaris_build" => Some(Self::PolarisBuild),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Build => "build",
            Self::PolarisBuild => "polaris_build",
        }
    }

    /// The record's `type`: pull and build make `pyats` images, polaris_build `polaris` ones.
    pub fn report_type(self) -> &'static str {
        match self {
            Self::Pull | Self::Build => "pyats",
            Self::PolarisBuild => "polaris",
        }
    }

    /// The cap a worker needs to take this job.
    pub fn cap(self) -> &'static str {
        match self {
            Self::Pull | Self::Build => "image",
            Self::PolarisBuild => "polaris_image",
        }
    }
}

/// A validated job.
#[derive(Clone)]
pub struct Job {
    pub uuid: String,
    pub job_type: JobType,
    pub group: String,
    pub name: String,
    pub tag: String,
    /// Registry and namespace; empty for a polaris_build that takes the configured default.
    pub push_url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub discover: bool,
    pub pin_version: bool,
    pub platform: Option<String>,
    pub digest: Option<String>,
    pub yaml_content: Option<String>,
    pub git_ref: Option<String>,
    pub base_ref: Option<String>,
    pub timeout_s: Option<u64>,
    /// The message as received; echoed (secrets masked) in the report's `data`.
    pub raw: Map<String, Value>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("uuid", &self.uuid)
            .field("type", &self.job_type.as_str())
            .field("group", &self.group)
            .field("name", &self.name)
            .field("tag", &self.tag)
            .field("push_url", &self.push_url)
            .field("username", &self.username)
            .field(
                "password",
                &self.password.as_ref().map(|_| crate::secrets::MASK),
            )
            .finish_non_exhaustive()
    }
}

impl Job {
    /// `<push_url>/<name>`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.push_url.trim_end_matches('/'), self.name)
    }

    /// What to pull: `<push_url>/<name>@<digest>` when a digest is given, else `:<tag>`.
    pub fn source_reference(&self) -> String {
        match &self.digest {
            Some(d) => format!("{}@{}", self.repository(), d),
            None => format!("{}:{}", self.repository(), self.tag),
        }
    }

    pub fn timeout(&self, default_s: u64) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_s.unwrap_or(default_s).max(1))
    }
}

/// A message that cannot be a job; it is dead-lettered with this reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("message is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("message is not JSON: {0}")]
    NotJson(String),
    #[error("message is JSON but not an object")]
    NotAnObject,
    #[error("message has no valid uuid: {0}")]
    BadUuid(String),
    #[error("message has no valid type: {0}")]
    BadType(String),
}

/// A job with a uuid and a type whose other fields are wrong; it gets a `failed` report.
#[derive(Debug, Clone)]
pub struct InvalidJob {
    pub uuid: String,
    pub job_type: JobType,
    pub raw: Map<String, Value>,
    pub message: String,
    /// The report's `error.kind`: `invalid_job`, or why the job could not even start.
    pub kind: &'static str,
    pub retryable: bool,
}

impl InvalidJob {
    /// A valid job that cannot start here (e.g. the engine does not answer `image-worker job`).
    pub fn cannot_start(job: &Job, kind: &'static str, message: String, retryable: bool) -> Self {
        Self {
            uuid: job.uuid.clone(),
            job_type: job.job_type,
            raw: job.raw.clone(),
            message,
            kind,
            retryable,
        }
    }
}

/// Parses and validates a job message body.
pub fn parse_job(body: &[u8], max_bytes: usize) -> Result<Result<Job, InvalidJob>, Rejection> {
    if body.len() > max_bytes {
        return Err(Rejection::TooLarge {
            size: body.len(),
            limit: max_bytes,
        });
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Rejection::NotJson(e.to_string()))?;
    let Value::Object(raw) = value else {
        return Err(Rejection::NotAnObject);
    };
    let uuid = match raw.get("uuid") {
        // Checked in its hyphenated form only (it names a directory), but kept as sent, case
        // included: the sender matches its report by this exact string.
        Some(Value::String(s)) if s.len() != 36 => {
            return Err(Rejection::BadUuid(format!(
                "{s:?}: expected the hyphenated form, e.g. 1d252f72-181b-4af8-91d1-da34f248a004"
            )));
        }
        Some(Value::String(s)) => uuid::Uuid::parse_str(s)
            .map(|_| s.clone())
            .map_err(|e| Rejection::BadUuid(format!("{s:?}: {e}")))?,
        Some(other) => {
            return Err(Rejection::BadUuid(format!(
                "expected a string, got {other}"
            )));
        }
        None => return Err(Rejection::BadUuid("field uuid is missing".into())),
    };
    let job_type = match raw.get("type") {
        Some(Value::String(s)) => JobType::parse(s).ok_or_else(|| {
            Rejection::BadType(format!("{s:?} is not one of pull, build, polaris_build"))
        })?,
        Some(other) => {
            return Err(Rejection::BadType(format!(
                "expected a string, got {other}"
            )));
        }
        None => return Err(Rejection::BadType("field type is missing".into())),
    };
    Ok(
        validate(uuid.clone(), job_type, &raw).map_err(|message| InvalidJob {
            kind: "invalid_job",
            retryable: false,
            uuid,
            job_type,
            raw: raw.clone(),
            message,
        }),
    )
}

fn validate(uuid: String, job_type: JobType, raw: &Map<String, Value>) -> Result<Job, String> {
    let fields = Fields(raw);
    let group = fields.string("group")?.ok_or("field group is required")?;
    if group.is_empty()
        || group.len() > 64
        || !group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "group {group:?} is not valid: 1 to 64 letters, digits, '-', '_' or '.'"
        ));
    }
    let name = fields.string("name")?.ok_or("field name is required")?;
    reference::validate_name(&name)?;
    let tag = fields.string("tag")?.unwrap_or_else(|| "latest".into());
    reference::validate_tag(&tag)?;
    let push_url = fields.string("push_url")?.unwrap_or_default();
    let push_url = push_url.trim_end_matches('/').to_string();
    match job_type {
        JobType::PolarisBuild if push_url.is_empty() => {}
        _ if push_url.is_empty() => return Err("field push_url is required".into()),
        _ => reference::validate_push_url(&push_url)?,
    }
    if !push_url.is_empty() {
        reference::repository(&push_url, &name)?;
    }
    let digest = fields.string("digest")?;
    if let Some(d) = &digest {
        reference::validate_digest(d)?;
    }
    let platform = fields.string("platform")?;
    if let Some(p) = &platform {
        reference::validate_platform(p)?;
    }
    let username = fields.string("username")?.filter(|s| !s.is_empty());
    let password = fields.string("password")?.filter(|s| !s.is_empty());
    if password.is_some() && username.is_none() {
        return Err("field password is given without username".into());
    }
    let yaml_content = fields.string("yaml_content")?;
    let git_ref = fields.string("git_ref")?;
    let base_ref = fields.string("base_ref")?;
    match job_type {
        JobType::Build if yaml_content.as_deref().is_none_or(str::is_empty) => {
            return Err("field yaml_content is required for a build job".into());
        }
        JobType::PolarisBuild if git_ref.as_deref().is_none_or(str::is_empty) => {
            return Err("field git_ref is required for a polaris_build job".into());
        }
        _ => {}
    }
    let timeout_s = match raw.get("timeout_s") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Some(n),
            _ => {
                return Err(format!(
                    "field timeout_s must be a positive integer, got {v}"
                ));
            }
        },
    };
    Ok(Job {
        uuid,
        job_type,
        group,
        name,
        tag,
        push_url,
        username,
        password,
        discover: fields.bool("discover")?.unwrap_or(true),
        pin_version: fields.bool("pin_version")?.unwrap_or(false),
        platform,
        digest,
        yaml_content,
        git_ref,
        base_ref,
        timeout_s,
        raw: raw.clone(),
    })
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn string(&self, key: &str) -> Result<Option<String>, String> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "field {key} must be a string, got {}",
                kind_of(other)
            )),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(format!(
                "field {key} must be true or false, got {}",
                kind_of(other)
            )),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "1d252f72-181b-4af8-91d1-da34f248a004";

    fn parse(v: Value) -> Result<Result<Job, InvalidJob>, Rejection> {
        parse_job(v.to_string().as_bytes(), 1 << 20)
    }

    fn pull(extra: Value) -> Value {
        let mut base = serde_json::json!({
            "uuid": UUID, "type": "pull", "group": "haifwu", "name": "pyats",
            "push_url": "127.0.0.1:5000/fixtures"
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    #[test]
    fn valid_pull_with_defaults() {
        let job = parse(pull(serde_json::json!({"extra_field": 1})))
            .unwrap()
            .unwrap();
        assert_eq!(job.tag, "latest");
        assert!(job.discover);
        assert!(!job.pin_version);
        assert_eq!(
            job.source_reference(),
            "127.0.0.1:5000/fixtures/pyats:latest"
        );
        assert_eq!(job.raw["extra_field"], 1);
    }

    #[test]
    fn digest_reference() {
        let d = format!("sha256:{}", "b".repeat(64));
        let job = parse(pull(serde_json::json!({"digest": d})))
            .unwrap()
            .unwrap();
        assert_eq!(
            job.source_reference(),
            format!("127.0.0.1:5000/fixtures/pyats@{d}")
        );
    }

    #[test]
    fn rejections_go_to_dead_letter() {
        assert!(matches!(
            parse_job(b"not json", 100),
            Err(Rejection::NotJson(_))
        ));
        assert!(matches!(
            parse_job(b"\xff\xfe", 100),
            Err(Rejection::NotJson(_))
        ));
        assert_eq!(parse_job(b"[1]", 100).err(), Some(Rejection::NotAnObject));
        assert!(matches!(
            parse_job(&[b' '; 101], 100),
            Err(Rejection::TooLarge { .. })
        ));
        assert!(matches!(
            parse(serde_json::json!({"type": "pull"})),
            Err(Rejection::BadUuid(_))
        ));
        for odd in [
            "nope",
            "urn:uuid:1d252f72-181b-4af8-91d1-da34f248a004",
            "{1d252f72-181b-4af8-91d1-da34f248a004}",
            "1d252f72181b4af891d1da34f248a004",
        ] {
            assert!(
                matches!(
                    parse(serde_json::json!({"uuid": odd, "type": "pull"})),
                    Err(Rejection::BadUuid(_))
                ),
                "{odd}"
            );
        }
        assert!(matches!(
            parse(serde_json::json!({"uuid": UUID, "type": "delete"})),
            Err(Rejection::BadType(_))
        ));
    }

    #[test]
    fn invalid_fields_become_failed_reports() {
        let cases = [
            (
                serde_json::json!({"name": "Bad Name"}),
                "not a valid repository name",
            ),
            (
                serde_json::json!({"name": "../../etc"}),
                "not a valid repository name",
            ),
            (serde_json::json!({"tag": "a:b"}), "tag"),
            (serde_json::json!({"push_url": "no-host"}), "registry host"),
            (
                serde_json::json!({"discover": "yes"}),
                "field discover must be true or false",
            ),
            (
                serde_json::json!({"name": 5}),
                "field name must be a string",
            ),
            (serde_json::json!({"group": "a b"}), "group"),
            (serde_json::json!({"password": "p"}), "without username"),
            (serde_json::json!({"timeout_s": -1}), "timeout_s"),
            (serde_json::json!({"digest": "sha256:zz"}), "digest"),
        ];
        for (extra, want) in cases {
            let invalid = parse(pull(extra.clone())).unwrap().unwrap_err();
            assert_eq!(invalid.uuid, UUID);
            assert!(
                invalid.message.contains(want),
                "{extra}: {}",
                invalid.message
            );
        }
        let mut no_name = pull(serde_json::json!({}));
        no_name.as_object_mut().unwrap().remove("name");
        assert!(
            parse(no_name)
                .unwrap()
                .unwrap_err()
                .message
                .contains("name is required")
        );
    }

    #[test]
    fn debug_hides_password() {
        let job = parse(pull(
            serde_json::json!({"username": "u", "password": "hunter2"}),
        ))
        .unwrap()
        .unwrap();
        assert!(!format!("{job:?}").contains("hunter2"));
    }
}
