//! Keeping secrets out of every output: logs, events, reports, files under `logs_dir`.
//!
//! A job registers its secrets (the registry password, tokens) in a [`SecretMask`]; every line
//! that leaves the job goes through [`SecretMask::mask`]. Engine and registry messages can also
//! echo URLs with credentials; [`mask_url_credentials`] removes those whatever they hold.

use std::sync::OnceLock;

use regex::Regex;

/// What a secret is replaced with.
pub const MASK: &str = "********";

/// Field names whose values are secrets wherever they appear in a job message.
pub const SECRET_FIELDS: &[&str] = &[
    "password",
    "automation_token",
    "token",
    "secret",
    "ssh_key",
    "credentials",
];

/// The secrets of one job.
#[derive(Debug, Clone, Default)]
pub struct SecretMask {
    secrets: Vec<String>,
}

impl SecretMask {
    /// Adds a secret; empty and very short values are ignored (masking "a" would mangle text,
    /// and a one-character password is no secret).
    pub fn add(&mut self, secret: impl Into<String>) {
        let secret = secret.into();
        if secret.len() >= 3 && !self.secrets.contains(&secret) {
            self.secrets.push(secret);
            // Longest first, so a secret that contains another is masked whole.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    /// `text` with every registered secret and every URL credential replaced by [`MASK`].
    pub fn mask(&self, text: &str) -> String {
        let mut out = mask_url_credentials(text);
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MASK);
            }
        }
        out
    }

    /// Masks a JSON value in place: values of secret fields, and secrets inside strings.
    pub fn mask_json(&self, value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(s) => {
                let masked = self.mask(s);
                if masked != *s {
                    *s = masked;
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.mask_json(v)),
            serde_json::Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    // Booleans and numbers are flags (`default_credential`), not secrets.
                    if is_secret_field(key) && (v.is_string() || v.is_object() || v.is_array()) {
                        *v = serde_json::Value::String(MASK.into());
                    } else {
                        self.mask_json(v);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Parts of a field name that make its value a secret.
const SECRET_NAME_PARTS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "private_key",
    "ssh_key",
    "credential",
];

/// Whether a field of that name holds a secret: the known names, and any name containing
/// `password`, `token`, `secret`, `api_key`, `private_key`, `credential`... (`auth` alone too).
pub fn is_secret_field(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_FIELDS.iter().any(|f| name == *f)
        || name == "auth"
        || SECRET_NAME_PARTS.iter().any(|p| name.contains(p))
}

/// Replaces `user:password@` in any URL of `text` with `********@`.
pub fn mask_url_credentials(text: &str) -> String {
    static URL_CREDENTIALS: OnceLock<Regex> = OnceLock::new();
    let re = URL_CREDENTIALS
        // Up to the last '@' before the path: a password may hold an unencoded '@'.
        .get_or_init(|| Regex::new(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@").unwrap());
    re.replace_all(text, format!("${{scheme}}{MASK}@").as_str())
        .into_owned()
}

/// Masks text that should be JSON but does not parse (a job followed by garbage, invalid UTF-8
/// inside): every `"<secret field>": "<string>"` pair gets [`MASK`] as its value, and URL
/// credentials are masked. `None` when text that looks secret is left over that no such rule
/// covers (a secret field holding an object or a number, YAML credentials inside a string, an
/// escaped pair): the caller must not keep that text at all.
pub fn mask_text_fields(text: &str) -> Option<String> {
    static PAIR: OnceLock<Regex> = OnceLock::new();
    let pair = PAIR.get_or_init(|| {
        Regex::new(r#""(?P<key>(?:[^"\\]|\\.)*)"(?P<sep>\s*:\s*)"(?:[^"\\]|\\.)*""#).unwrap()
    });
    let masked = mask_url_credentials(text);
    let out = pair.replace_all(&masked, |c: &regex::Captures| {
        if is_secret_field(&c["key"]) {
            format!("\"{}\"{}\"{MASK}\"", &c["key"], &c["sep"])
        } else {
            c[0].to_string()
        }
    });
    // What is left once the masked pairs are taken out must not look secret at all.
    let residue = pair
        .replace_all(&out, |c: &regex::Captures| {
            if is_secret_field(&c["key"]) {
                String::new()
            } else {
                c[0].to_string()
            }
        })
        .to_ascii_lowercase();
    let looks_secret = SECRET_NAME_PARTS
        .iter()
        .chain(SECRET_FIELDS)
        .any(|part| residue.contains(part))
        || residue.contains("\"auth\"");
    (!looks_secret).then(|| out.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_secret_fields_in_text_that_is_not_json() {
        // A job followed by garbage: the pair is masked, the rest kept byte for byte.
        let text = r#"{"uuid": "u", "name": "n", "Password" : "corpus-secret-pw", "x": "a\"b"} }{"#;
        assert_eq!(
            mask_text_fields(text).as_deref(),
            Some(r#"{"uuid": "u", "name": "n", "Password" : "********", "x": "a\"b"} }{"#)
        );
        // Escaped quotes inside a secret value do not end it early.
        assert_eq!(
            mask_text_fields(r#"{"token": "a\"b\\", "n": 1}garbage"#).as_deref(),
            Some(r#"{"token": "********", "n": 1}garbage"#)
        );
        // Nothing secret: unchanged (a replacement character from invalid UTF-8 included).
        let plain = "{\"name\": \"fixtures/\u{fffd}basic\"} x";
        assert_eq!(mask_text_fields(plain).as_deref(), Some(plain));
        assert_eq!(
            mask_text_fields("see https://bob:pw@reg.example/v2 }").as_deref(),
            Some("see https://********@reg.example/v2 }")
        );
        // Secret-looking text no rule masks: refused, never passed on.
        for unmaskable in [
            r#"{"credentials": {"username": "u", "pw": "p"}} x"#,
            r#"{"yaml_content": "repositories: {r: {credentials: {password: s3cr3t}}}"} x"#,
            r#"{"note": "{\"password\": \"s3cr3t\"}"} x"#,
            r#"{"auth": 12345} x"#,
            "password=s3cr3t",
        ] {
            assert_eq!(mask_text_fields(unmaskable), None, "{unmaskable}");
        }
    }

    #[test]
    fn masks_registered_secrets_and_url_credentials() {
        let mut m = SecretMask::default();
        m.add("hunter2-long");
        m.add("x"); // too short to mask
        let text =
            "login with hunter2-long to https://bob:pw@reg.example/v2/ and amqp://u:S@P@h:5672";
        let out = m.mask(text);
        assert_eq!(
            out,
            "login with ******** to https://********@reg.example/v2/ and amqp://********@h:5672"
        );
    }

    #[test]
    fn masks_longest_secret_first() {
        let mut m = SecretMask::default();
        m.add("abc");
        m.add("abcdef");
        assert_eq!(m.mask("pw=abcdef"), "pw=********");
    }

    #[test]
    fn masks_json_secret_fields_and_embedded_values() {
        let mut m = SecretMask::default();
        m.add("s3cr3t-value");
        let mut v = serde_json::json!({
            "password": "anything",
            "automation_token": "Jwt abc",
            "name": "n",
            "nested": {"note": "it is s3cr3t-value here", "registry_password": "p"},
            "list": ["s3cr3t-value"],
            "null_password": null,
            "access_token": "t0k3n-value",
            "API_KEY": "k3y-value",
            "passwd": "pw-value",
            "auth": "basic xyz",
            "default_credential": true
        });
        m.mask_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({
                "password": MASK,
                "automation_token": MASK,
                "name": "n",
                "nested": {"note": "it is ******** here", "registry_password": MASK},
                "list": [MASK],
                "null_password": null,
                "access_token": MASK,
                "API_KEY": MASK,
                "passwd": MASK,
                "auth": MASK,
                "default_credential": true
            })
        );
    }
}
