//! API tokens as they are kept: the role a token grants, the record of
//! its SHA-256 (never the token itself), the tokens file of a data
//! directory (`<sha256 hex> <role> <name>` a line, replaced atomically), and
//! the making of new tokens. The shared database keeps the same records
//! (`store::postgres::tokens`); `server::auth` checks requests against
//! either.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use probe_api::digest::Sha256Digest;

/// What a token may do. `Admin` may do everything `View` may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    /// Query and list probes.
    View,
    /// Also upload probes.
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::View => "view",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "view" => Some(Role::View),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of the tokens file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub hash: Sha256Digest,
    pub role: Role,
    pub name: String,
}

/// The tokens file of a data directory.
#[derive(Clone, Debug)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    pub fn in_data_dir(data_dir: &Path) -> Self {
        TokenFile { path: data_dir.join("tokens") }
    }

    /// All tokens; none when the file does not exist yet.
    pub fn load(&self) -> io::Result<Vec<TokenRecord>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let mut fields = line.splitn(3, ' ');
                let hash = fields.next().and_then(Sha256Digest::from_hex);
                let role = fields.next().and_then(Role::parse);
                let name = fields.next().unwrap_or_default().to_owned();
                match (hash, role) {
                    (Some(hash), Some(role)) => Ok(TokenRecord { hash, role, name }),
                    _ => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: malformed line {line:?}", self.path.display()),
                    )),
                }
            })
            .collect()
    }

    /// Makes a new token, stores its hash and returns the token itself:
    /// the only time it is ever seen.
    pub fn create(&self, role: Role, name: &str) -> io::Result<String> {
        let mut records = self.load()?;
        if records.iter().any(|r| r.name == name) {
            return Err(name_taken(name));
        }
        let (token, record) = new_token(role, name)?;
        records.push(record);
        self.save(&records)?;
        Ok(token)
    }

    /// Removes the token named `name`; false if there was none.
    pub fn revoke(&self, name: &str) -> io::Result<bool> {
        let mut records = self.load()?;
        let before = records.len();
        records.retain(|r| r.name != name);
        if records.len() == before {
            return Ok(false);
        }
        self.save(&records)?;
        Ok(true)
    }

    /// Replaces the file atomically: a reader sees the old or the new list.
    fn save(&self, records: &[TokenRecord]) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut text = String::new();
        for r in records {
            text.push_str(&format!("{} {} {}\n", r.hash, r.role, r.name));
        }
        // Readable by Central's user only: the hashes are not the tokens, but
        // they are what a stolen copy would be guessed against.
        crate::private_file::replace(&self.path, text.as_bytes())
    }
}

pub(crate) fn hash_token(token: &str) -> Sha256Digest {
    Sha256Digest::of(token.as_bytes())
}

/// A new random token named `name`, and the record that keeps its hash.
pub fn new_token(role: Role, name: &str) -> io::Result<(String, TokenRecord)> {
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a token name must be non-empty and without white space",
        ));
    }
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).map_err(io::Error::other)?;
    let token = format!("kp_{}", Sha256Digest(secret).to_hex());
    let record = TokenRecord { hash: hash_token(&token), role, name: name.to_owned() };
    Ok((token, record))
}

pub fn name_taken(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("a token named {name:?} exists already; revoke it first or pick another name"),
    )
}

/// How often Central reloads tokens kept in the shared database.
pub const SHARED_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Tokens loaded from elsewhere (the shared database), replaced whole by
/// whoever reloads them.
pub type SharedTokens = Arc<RwLock<Arc<Vec<TokenRecord>>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_names_are_unique_and_without_spaces() {
        let dir = tempfile::tempdir().unwrap();
        let file = TokenFile::in_data_dir(dir.path());
        file.create(Role::View, "a").unwrap();
        assert!(file.create(Role::Admin, "a").is_err());
        assert!(file.create(Role::Admin, "a b").is_err());
        assert!(file.create(Role::Admin, "").is_err());
    }
}
