//! `https://` URLs and `host[:port]` authorities, split as the client and
//! the proxy settings need them.

use std::fmt;

use super::error::{HttpsError, error};

/// An `https://host[:port]/path` URL, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsUrl {
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl HttpsUrl {
    pub fn parse(url: &str) -> Result<HttpsUrl, HttpsError> {
        let rest = url.strip_prefix("https://").ok_or_else(|| error(format!("{url:?} is not an https:// URL")))?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(error("an https:// URL with credentials is not supported"));
        }
        let (host, port) = split_host_port(authority, 443).ok_or_else(|| error(format!("{url:?}: no host")))?;
        Ok(HttpsUrl { host, port, path: path.to_owned() })
    }

    /// This URL with `suffix` (already a valid path, no leading `/`)
    /// appended to its path.
    pub fn join(&self, suffix: &str) -> HttpsUrl {
        let separator = if self.path.ends_with('/') { "" } else { "/" };
        HttpsUrl { path: format!("{}{separator}{suffix}", self.path), ..self.clone() }
    }

    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}{}", self.authority(), self.path)
    }
}

/// `host[:port]` or `[v6]:port`, the host without brackets.
pub(crate) fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(port) => port.parse().ok()?,
        None => default_port,
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        let url = HttpsUrl::parse("https://bucket.example.com/collector/modules").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("bucket.example.com", 443, "/collector/modules"));
        assert_eq!(url.join("2.5.0/x.o.gz").path, "/collector/modules/2.5.0/x.o.gz");
        let url = HttpsUrl::parse("https://[::1]:8443").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("::1", 8443, "/"));
        assert_eq!(url.join("a").to_string(), "https://[::1]:8443/a");
        for bad in ["http://example.com/", "https://", "https://user:pw@example.com/", "https://h:port/"] {
            assert!(HttpsUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
