//! Docker image reference grammar (distribution/reference), checked before anything reaches the
//! engine, so an impossible name fails with a message that says which part is wrong.

use std::sync::OnceLock;

use regex::Regex;

/// Longest repository name (registry and path) the grammar allows.
pub const MAX_NAME_LEN: usize = 255;

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("static regex"))
}

const PATH_COMPONENT: &str = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*";
const DOMAIN: &str = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]{1,5})?";

fn path_re() -> &'static Regex {
    static CELL: OnceLock<Regex> = OnceLock::new();
    re(&CELL, &format!("^{PATH_COMPONENT}(?:/{PATH_COMPONENT})*$"))
}

fn domain_re() -> &'static Regex {
    static CELL: OnceLock<Regex> = OnceLock::new();
    re(&CELL, &format!("^{DOMAIN}$"))
}

/// Checks an image name (the repository path below `push_url`), e.g. `pyats` or `team/pyats`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name is longer than {MAX_NAME_LEN} characters"));
    }
    if !path_re().is_match(name) {
        return Err(format!(
            "name {name:?} is not a valid repository name: lowercase letters, digits and \
             '.', '_', '__', '-' between them, components separated by '/'"
        ));
    }
    Ok(())
}

/// Checks a tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    static CELL: OnceLock<Regex> = OnceLock::new();
    if re(&CELL, r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$").is_match(tag) {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} is not valid: up to 128 letters, digits, '_', '.' and '-', not starting \
             with '.' or '-'"
        ))
    }
}

/// Checks a digest such as `sha256:<64 hex>`.
pub fn validate_digest(digest: &str) -> Result<(), String> {
    static CELL: OnceLock<Regex> = OnceLock::new();
    let ok = re(&CELL, r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-fA-F0-9]{32,}$").is_match(digest)
        && (!digest.starts_with("sha256:") || digest.len() == "sha256:".len() + 64);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "digest {digest:?} is not valid: expected <algorithm>:<hex>, e.g. sha256: and 64 hex digits"
        ))
    }
}

/// Checks a platform such as `linux/amd64` or `linux/arm64/v8`.
pub fn validate_platform(platform: &str) -> Result<(), String> {
    static CELL: OnceLock<Regex> = OnceLock::new();
    if re(&CELL, r"^[a-z0-9_]+/[a-z0-9_]+(?:/[a-z0-9_]+)?$").is_match(platform) {
        Ok(())
    } else {
        Err(format!(
            "platform {platform:?} is not valid: expected os/arch[/variant], e.g. linux/amd64"
        ))
    }
}

/// Checks a `push_url`: a registry host (with optional port) and an optional namespace,
/// e.g. `registry.example.com/team` or `127.0.0.1:5000/fixtures`.
pub fn validate_push_url(push_url: &str) -> Result<(), String> {
    let (domain, path) = match push_url.split_once('/') {
        Some((d, p)) => (d, Some(p)),
        None => (push_url, None),
    };
    if push_url.contains("://") {
        return Err(format!(
            "push_url {push_url:?} must be a registry host and namespace, without a scheme"
        ));
    }
    let looks_like_host = domain.contains('.') || domain.contains(':') || domain == "localhost";
    if !looks_like_host || !domain_re().is_match(domain) {
        return Err(format!(
            "push_url {push_url:?} must start with a registry host (e.g. registry.example.com or \
             127.0.0.1:5000)"
        ));
    }
    if let Some(path) = path
        && !path_re().is_match(path)
    {
        return Err(format!(
            "push_url {push_url:?} has an invalid namespace {path:?}: lowercase letters, digits \
             and separators, components separated by '/'"
        ));
    }
    Ok(())
}

/// The registry host (`host[:port]`) of a `push_url`.
pub fn registry_host(push_url: &str) -> &str {
    push_url.split('/').next().unwrap_or(push_url)
}

/// `<push_url>/<name>` checked against the total length limit.
pub fn repository(push_url: &str, name: &str) -> Result<String, String> {
    let repo = format!("{}/{}", push_url.trim_end_matches('/'), name);
    if repo.len() > MAX_NAME_LEN {
        return Err(format!(
            "{repo:?} is longer than {MAX_NAME_LEN} characters, the limit of an image name"
        ));
    }
    Ok(repo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["pyats", "team/pyats-img", "a.b_c__d--e", "x/y/z9"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "Upper", "-lead", "trail-", "a//b", "../etc", "a b", "a;rm -rf", "a:b", "a@b",
            "/abs",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_name(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "0824", "v1.2.3-rc_1", "_x"] {
            assert!(validate_tag(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a b", &"a".repeat(129)] {
            assert!(validate_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_and_platforms() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(validate_digest(&good).is_ok());
        assert!(validate_digest("sha256:abc").is_err());
        assert!(validate_digest("latest").is_err());
        assert!(validate_platform("linux/amd64").is_ok());
        assert!(validate_platform("linux/arm64/v8").is_ok());
        assert!(validate_platform("linux").is_err());
        assert!(validate_platform("linux/amd64;x").is_err());
    }

    #[test]
    fn push_urls() {
        for ok in [
            "dockerhub.cisco.com/ng-taas-docker/haifwu",
            "127.0.0.1:5000/fixtures",
            "localhost:5000",
            "docker.io/library",
        ] {
            assert!(validate_push_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "library",
            "http://reg.example/x",
            "reg.example/UP",
            "reg example/x",
            "reg.example:99999999/x",
        ] {
            assert!(validate_push_url(bad).is_err(), "{bad}");
        }
        assert_eq!(registry_host("127.0.0.1:5000/fixtures"), "127.0.0.1:5000");
    }
}
