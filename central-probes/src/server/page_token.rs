//! ListProbes page tokens: opaque to clients, checked by Central.
//!
//! A token names the last path of the page it follows, bound to the
//! listing's module-version filter and authenticated with HMAC-SHA256 under
//! a key kept in the store. So a token that no earlier response gave (made
//! up, edited, from another filter or another store) is refused with
//! INVALID_ARGUMENT, and a second Central on the same store accepts the
//! tokens of its peer.

use probe_api::digest::{hex_decode, hex_encode};
use probe_api::names::{ModuleVersion, ProbePath};
use ring::hmac;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// Bytes of the tag kept in a token: 128 bits are plenty against forgery.
const TAG_LEN: usize = 16;

pub struct PageTokens {
    key: hmac::Key,
}

impl PageTokens {
    pub fn new(secret: &[u8]) -> Self {
        PageTokens { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    /// The token for the page that follows `last`.
    pub fn issue(&self, filter: Option<&ModuleVersion>, last: &ProbePath) -> String {
        let path = last.to_string();
        format!("{}.{}", hex_encode(path.as_bytes()), hex_encode(&self.tag(filter, &path)))
    }

    /// The path a token continues after, if this store issued it for this
    /// filter.
    pub fn check(&self, filter: Option<&ModuleVersion>, token: &str) -> Result<ProbePath> {
        let refused = || Error::invalid_argument("page_token is not one this server gave for this listing");
        let (path_hex, tag_hex) = token.split_once('.').ok_or_else(refused)?;
        let path = hex_decode(path_hex).and_then(|bytes| String::from_utf8(bytes).ok()).ok_or_else(refused)?;
        let tag = hex_decode(tag_hex).ok_or_else(refused)?;
        // A constant-time comparison: timing must not reveal the right tag.
        if !bool::from(tag.ct_eq(&self.tag(filter, &path))) {
            return Err(refused());
        }
        ProbePath::parse(&path).map_err(|_| refused())
    }

    fn tag(&self, filter: Option<&ModuleVersion>, path: &str) -> [u8; TAG_LEN] {
        let full = hmac::sign(&self.key, &message(filter, path));
        full.as_ref()[..TAG_LEN].try_into().expect("SHA-256 is longer than the tag")
    }
}

fn message(filter: Option<&ModuleVersion>, path: &str) -> Vec<u8> {
    let filter = filter.map_or("", |v| v.as_str());
    [filter.as_bytes(), b"\0", path.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> ProbePath {
        ProbePath::parse(s).unwrap()
    }

    #[test]
    fn a_token_round_trips_only_with_its_key_and_filter() {
        let tokens = PageTokens::new(b"key one");
        let v = ModuleVersion::parse("2.5.0").unwrap();
        let last = path("2.5.0/collector-5.4.0.ko.gz");
        let token = tokens.issue(Some(&v), &last);
        assert_eq!(tokens.check(Some(&v), &token).unwrap(), last);
        assert_eq!(PageTokens::new(b"key one").check(Some(&v), &token).unwrap(), last, "a peer with the key");

        let code = |result: Result<ProbePath>| result.unwrap_err().code;
        assert_eq!(code(PageTokens::new(b"key two").check(Some(&v), &token)), tonic::Code::InvalidArgument);
        assert_eq!(code(tokens.check(None, &token)), tonic::Code::InvalidArgument);
    }

    #[test]
    fn forged_and_malformed_tokens_are_refused() {
        let tokens = PageTokens::new(b"key");
        let genuine = tokens.issue(None, &path("2.5.0/collector-5.4.0.ko.gz"));
        let (path_hex, tag_hex) = genuine.split_once('.').unwrap();
        let other_path = hex_encode(b"2.5.0/collector-5.5.0.ko.gz");
        let mut flipped_tag = tag_hex.to_owned();
        flipped_tag.replace_range(0..1, if tag_hex.starts_with('0') { "1" } else { "0" });
        for forged in [
            String::new(),
            "2.5.0/collector-5.4.0.ko.gz".to_owned(),
            format!("{other_path}.{tag_hex}"),
            format!("{path_hex}.{flipped_tag}"),
            format!("{path_hex}.{}", &tag_hex[..30]),
            format!("{path_hex}.{tag_hex}00"),
            format!("{path_hex}."),
            format!("zz.{tag_hex}"),
            format!("{}.{tag_hex}", hex_encode(b"not a path")),
        ] {
            assert!(tokens.check(None, &forged).is_err(), "{forged:?} should be refused");
        }
    }
}
