//! Authentication (SPEC §1): `passthrough` forwards the caller's bearer, `keys` checks gateway keys
//! by SHA-256 digest in constant time and swaps in the configured upstream key.

use crate::config::{AuthMode, Config};
use crate::error::LocalReply;
use crate::route::Scope;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What to do with the `authorization` header of an accepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// Forward it unchanged (passthrough mode).
    Keep,
    /// Replace it with this value (keys mode: `Bearer <upstream key>`).
    Replace(String),
}

/// Checks the `authorization` header against the configuration for a route needing `scope`.
pub fn authenticate(
    config: &Config,
    authorization: Option<&str>,
    scope: Scope,
) -> Result<Credential, LocalReply> {
    let token = authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(LocalReply::unauthorized)?;
    match config.auth_mode {
        AuthMode::Passthrough => Ok(Credential::Keep),
        AuthMode::Keys => {
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            // Compare against every key so timing does not reveal which one matched.
            let mut found = None;
            for key in &config.keys {
                if bool::from(key.digest.ct_eq(&digest)) {
                    found = Some(key);
                }
            }
            let key = found.ok_or_else(|| LocalReply::error(403, "forbidden", "invalid API key"))?;
            if !key.scope.allows(scope) {
                return Err(LocalReply::forbidden_scope(scope.as_str()));
            }
            let upstream = config.upstream_api_key.as_deref().unwrap_or_default();
            Ok(Credential::Replace(format!("Bearer {upstream}")))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::GatewayKey;

    fn keys_config() -> Config {
        let key = |name: &str, secret: &str, scope| GatewayKey {
            name: name.into(),
            digest: Sha256::digest(secret.as_bytes()).into(),
            scope,
        };
        Config {
            auth_mode: AuthMode::Keys,
            keys: vec![
                key("r", "read-key", Scope::Read),
                key("a", "admin-key", Scope::Admin),
            ],
            upstream_api_key: Some("tpuf_up".into()),
            ..Config::default()
        }
    }

    #[test]
    fn passthrough_needs_a_bearer_and_keeps_it() {
        let c = Config::default();
        assert_eq!(
            authenticate(&c, Some("Bearer abc"), Scope::Write),
            Ok(Credential::Keep)
        );
        for bad in [
            None,
            Some("bearer abc"),
            Some("Bearer "),
            Some("Basic x"),
            Some("abc"),
        ] {
            assert_eq!(
                authenticate(&c, bad, Scope::Read).unwrap_err().status,
                401,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn keys_mode_checks_digest_and_scope() {
        let c = keys_config();
        assert_eq!(
            authenticate(&c, Some("Bearer admin-key"), Scope::Admin),
            Ok(Credential::Replace("Bearer tpuf_up".into()))
        );
        assert!(authenticate(&c, Some("Bearer read-key"), Scope::Read).is_ok());
        let small = authenticate(&c, Some("Bearer read-key"), Scope::Write).unwrap_err();
        assert_eq!(small.status, 403);
        let v: serde_json::Value = serde_json::from_slice(&small.body).unwrap();
        assert_eq!(v["required_scope"], "write");
        let unknown = authenticate(&c, Some("Bearer nope"), Scope::Read).unwrap_err();
        assert_eq!(unknown.status, 403);
        assert_eq!(authenticate(&c, None, Scope::Read).unwrap_err().status, 401);
    }
}
