//! API tokens for the admin-facing service: which token a request carries
//! and what its role allows.
//!
//! `central-probes token create` makes a random token, prints it once and
//! keeps only its SHA-256 (`store::tokens`): in `<data dir>/tokens`, or in
//! the shared database's `api_tokens` table. Central reads the file on each
//! check (it is small), so a revoked token stops working at once; the
//! database's tokens it reloads every `SHARED_REFRESH` (so within that on
//! every replica). Presented tokens are hashed and compared with every
//! stored hash in constant time.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::Code;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};
use crate::store::tokens::hash_token;
// The records live with the store, below the server; they are re-exported
// here, where callers of the server look for them.
pub use crate::store::tokens::{Role, SHARED_REFRESH, SharedTokens, TokenFile, TokenRecord, name_taken, new_token};

#[derive(Clone, Debug)]
enum Tokens {
    File(TokenFile),
    Shared(SharedTokens),
}

/// The token a request was authorized by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Checks the bearer token of a request against the stored tokens.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    tokens: Tokens,
}

impl TokenAuth {
    pub fn new(tokens: TokenFile) -> Self {
        TokenAuth { tokens: Tokens::File(tokens) }
    }

    /// Checks against `tokens`, which the caller keeps up to date.
    pub fn shared(tokens: SharedTokens) -> Self {
        TokenAuth { tokens: Tokens::Shared(tokens) }
    }

    fn records(&self) -> Result<Arc<Vec<TokenRecord>>> {
        match &self.tokens {
            Tokens::File(file) => {
                file.load().map(Arc::new).map_err(|e| Error::internal(format!("reading the tokens: {e}")))
            }
            Tokens::Shared(shared) => Ok(shared.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()),
        }
    }

    /// The role of the request's token if it has at least `needed`:
    /// UNAUTHENTICATED for a missing or unknown token, PERMISSION_DENIED for
    /// too weak a role.
    pub fn authorize(&self, metadata: &MetadataMap, needed: Role) -> Result<Role> {
        self.caller(metadata, needed).map(|caller| caller.role)
    }

    /// `authorize`, naming the token that was presented (for the audit log).
    pub fn caller(&self, metadata: &MetadataMap, needed: Role) -> Result<Caller> {
        let unauthenticated = |why: &str| Error::new(Code::Unauthenticated, why.to_owned());
        let Some(value) = metadata.get("authorization") else {
            return Err(unauthenticated("missing API token: send the metadata \"authorization: Bearer <token>\""));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthenticated("malformed authorization metadata: expected \"Bearer <token>\""))?;
        let presented = hash_token(token);
        let records = self.records()?;
        // Every record is compared, matched or not, so timing tells nothing.
        let mut found = None;
        for record in records.iter() {
            if bool::from(record.hash.0.ct_eq(&presented.0)) {
                found = Some(record);
            }
        }
        let record = found.ok_or_else(|| unauthenticated("unknown or revoked API token"))?;
        let role = record.role;
        if role < needed {
            return Err(Error::new(
                Code::PermissionDenied,
                format!("this needs a token with role {needed}; yours has role {role}"),
            ));
        }
        Ok(Caller { name: record.name.clone(), role })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", value.parse().unwrap());
        metadata
    }

    #[test]
    fn tokens_authorize_by_role_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let file = TokenFile::in_data_dir(dir.path());
        let admin = file.create(Role::Admin, "ci").unwrap();
        let view = file.create(Role::View, "dashboard").unwrap();
        assert!(!fs::read_to_string(dir.path().join("tokens")).unwrap().contains(&admin));
        let auth = TokenAuth::new(file.clone());

        let bearer = |t: &str| metadata(&format!("Bearer {t}"));
        assert_eq!(auth.authorize(&bearer(&admin), Role::Admin).unwrap(), Role::Admin);
        assert_eq!(auth.authorize(&bearer(&view), Role::View).unwrap(), Role::View);
        assert_eq!(auth.authorize(&bearer(&view), Role::Admin).unwrap_err().code, Code::PermissionDenied);

        assert!(file.revoke("ci").unwrap());
        assert!(!file.revoke("ci").unwrap());
        assert_eq!(auth.authorize(&bearer(&admin), Role::View).unwrap_err().code, Code::Unauthenticated);
        assert_eq!(auth.authorize(&bearer(&view), Role::View).unwrap(), Role::View);
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let dir = tempfile::tempdir().unwrap();
        let auth = TokenAuth::new(TokenFile::in_data_dir(dir.path()));
        assert_eq!(auth.authorize(&MetadataMap::new(), Role::View).unwrap_err().code, Code::Unauthenticated);
        for value in ["", "Bearer ", "Basic abc", "kp_123", "Bearer kp_unknown"] {
            assert_eq!(auth.authorize(&metadata(value), Role::View).unwrap_err().code, Code::Unauthenticated);
        }
    }
}
