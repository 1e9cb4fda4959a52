//! Where an artifact lives: `HOST[:PORT]/PATH[:TAG]`, as skopeo and podman
//! write it without their `docker://` prefix, checked against the
//! distribution spec's grammar so that a typo fails before any request.

use std::fmt;

use super::error::{OciResult, invalid};

/// A repository on a registry, and maybe a tag in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `HOST` or `HOST:PORT`, as the auth file keys it.
    pub registry: String,
    pub host: String,
    pub port: u16,
    /// The repository path, `a/b/c`.
    pub repository: String,
    pub tag: Option<String>,
}

impl Reference {
    /// Parses `HOST[:PORT]/PATH[:TAG]`; a tag is refused unless `tag_allowed`.
    pub fn parse(text: &str, tag_allowed: bool) -> OciResult<Reference> {
        let usage = || {
            invalid(format!(
                "{text:?} is not a repository: write HOST[:PORT]/PATH{} (no scheme), e.g. registry.example.com:5000/kprobes/support",
                if tag_allowed { "[:TAG]" } else { "" }
            ))
        };
        let rest = text.strip_prefix("docker://").unwrap_or(text);
        let (registry, path) = rest.split_once('/').ok_or_else(usage)?;
        if registry.is_empty() || registry.contains("://") || text.contains("://") && !text.starts_with("docker://") {
            return Err(usage());
        }
        let (host, port) = match registry.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().map_err(|_| usage())?),
            None => (registry, 443),
        };
        // A tag follows the last `:` after the last `/`.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => (repository, Some(tag.to_owned())),
            _ => (path, None),
        };
        if tag.is_some() && !tag_allowed {
            return Err(invalid(format!("{text:?}: give the tag with --tag, not in --repository")));
        }
        if !repository.split('/').all(valid_component) {
            return Err(invalid(format!(
                "{text:?}: the repository path {repository:?} must be lowercase letters, digits and separators (. _ - /)"
            )));
        }
        if let Some(tag) = &tag {
            check_tag(tag)?;
        }
        Ok(Reference {
            registry: registry.to_owned(),
            host: host.to_owned(),
            port,
            repository: repository.to_owned(),
            tag,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        Ok(())
    }
}

/// `[a-z0-9]+([._-][a-z0-9]+)*` (`__` is allowed by the spec too).
fn valid_component(part: &str) -> bool {
    let bytes = part.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && alnum(&bytes[0])
        && alnum(&bytes[bytes.len() - 1])
        && bytes.iter().all(|b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn check_tag(tag: &str) -> OciResult<()> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{tag:?} is not a valid tag (letters, digits, . _ -, at most 128, not starting with . or -)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_registry_repository_and_tag() {
        let r = Reference::parse("127.0.0.1:5000/kprobes/support:2.5.0", true).unwrap();
        assert_eq!((r.host.as_str(), r.port, r.repository.as_str()), ("127.0.0.1", 5000, "kprobes/support"));
        assert_eq!((r.registry.as_str(), r.tag.as_deref()), ("127.0.0.1:5000", Some("2.5.0")));
        let r = Reference::parse("registry.example.com/a", false).unwrap();
        assert_eq!((r.port, r.tag), (443, None));
        for bad in ["registry", "https://r/a", "r/A", "r/a:b:", "r/a//b", "r:x/a", "r/a:.x", "/a"] {
            assert!(Reference::parse(bad, true).is_err(), "{bad}");
        }
        assert!(Reference::parse("r/a:1.0", false).unwrap_err().message.contains("--tag"));
        assert!(check_tag(&"a".repeat(128)).is_ok() && check_tag(&"a".repeat(129)).is_err());
        assert!(check_tag("5.14.0+1").is_err());
    }
}
