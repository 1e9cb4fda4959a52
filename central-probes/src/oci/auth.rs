//! Registry credentials as podman, skopeo and Docker keep them, and the two
//! ways registries ask for them.
//!
//! The auth file (`--registry-auth-file`, else `REGISTRY_AUTH_FILE`) is
//! containers-auth.json or Docker's `config.json`: `{"auths": {"HOST[:PORT]":
//! {"auth": base64("user:password")}}}` (keys may also carry `https://` or a
//! path, as `docker login` once wrote them). A registry answering 401 says
//! how to authenticate in `WWW-Authenticate`: `Basic` (the credentials on
//! every request) or `Bearer realm=...,service=...,scope=...` (the
//! credentials, if any, go to the realm once for a token that is then sent
//! instead). `Credentials` never shows its secret in `Debug`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine;

use super::error::{OciResult, invalid};

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    password: String,
}

impl Credentials {
    /// The `Authorization` value for Basic auth.
    pub fn basic(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials {{ username: {:?}, password: (hidden) }}", self.username)
    }
}

/// The credentials for `registry` (`HOST[:PORT]`) in the auth file at
/// `path`: `None` when the file has no entry for it.
pub fn credentials_for(path: &Path, registry: &str) -> OciResult<Option<Credentials>> {
    let what = || format!("the registry auth file {}", path.display());
    let text = std::fs::read(path).map_err(|e| invalid(format!("reading {}: {e}", what())))?;
    let json: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("{} is not JSON ({e}); it should be {{\"auths\": {{...}}}}", what())))?;
    let Some(auths) = json.get("auths").and_then(|a| a.as_object()) else { return Ok(None) };
    let normalise = |key: &str| -> String {
        let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
        key.split('/').next().unwrap_or_default().to_owned()
    };
    let Some(entry) = auths.iter().find(|(key, _)| normalise(key) == registry).map(|(_, entry)| entry) else {
        return Ok(None);
    };
    let bad =
        || invalid(format!("{}: the entry for {registry} has no valid \"auth\" (base64 of user:password)", what()));
    let encoded = entry.get("auth").and_then(|a| a.as_str()).ok_or_else(bad)?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (username, password) = decoded.split_once(':').ok_or_else(bad)?;
    Ok(Some(Credentials { username: username.to_owned(), password: password.to_owned() }))
}

/// How a registry asked to be authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    /// Ask `realm` for a token, with these query parameters.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value; `None` for schemes not supported.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parameters(rest);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `key="value", key=value` pairs (quoted values may hold commas).
fn parameters(text: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            },
            None => after.split_once(',').unwrap_or((after, "")),
        };
        params.insert(key, value.trim().to_owned());
        rest = after.trim_start_matches([',', ' ']);
    }
    params
}

/// The token in a token server's JSON answer (`token`, else `access_token`).
pub fn token_of(answer: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(answer).ok()?;
    json.get("token").or_else(|| json.get("access_token"))?.as_str().map(str::to_owned)
}

/// `%`-escapes a query parameter value.
pub fn query_escape(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_files_give_the_registrys_credentials_and_never_show_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        let json = format!(
            r#"{{"auths": {{"https://other:5000/v1/": {{"auth": "eA=="}}, "reg.example:5000": {{"auth": "{auth}"}}}}}}"#
        );
        std::fs::write(&file, json).unwrap();
        let found = credentials_for(&file, "reg.example:5000").unwrap().unwrap();
        assert_eq!(found.username, "alice");
        assert_eq!(found.basic(), format!("Basic {auth}"));
        assert!(!format!("{found:?}").contains("pa:ss"));
        assert_eq!(credentials_for(&file, "reg.example").unwrap(), None);
        assert!(credentials_for(&file, "other:5000").unwrap_err().message.contains("no valid \"auth\""));
        std::fs::write(&file, "not json").unwrap();
        assert!(credentials_for(&file, "x").unwrap_err().message.contains("not JSON"));
    }

    #[test]
    fn challenges_name_their_scheme_and_token_realm() {
        assert_eq!(parse_challenge(r#"Basic realm="test""#), Some(Challenge::Basic));
        let header =
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#;
        assert_eq!(
            parse_challenge(header),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(token_of(br#"{"access_token": "t1"}"#).as_deref(), Some("t1"));
        assert_eq!(query_escape("repository:a/b:pull,push"), "repository%3Aa%2Fb%3Apull%2Cpush");
    }
}
