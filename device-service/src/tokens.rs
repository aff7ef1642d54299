//! Device tokens minted by device-service: EdDSA (Ed25519) JWTs, and the public key
//! as a JWKS document for the gateways (`GET /v1/jwks.json`).
//!
//! One crypto stack: jsonwebtoken signs through aws-lc-rs (its `aws_lc_rs` feature),
//! and aws-lc-rs reads the PKCS#8 key (v1, as `openssl genpkey -algorithm ed25519`
//! writes it, or v2) to derive the public key. The key id (`kid`) is the key's
//! RFC 7638 thumbprint, so every replica with the same key names it the same way.

use std::time::Duration;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

/// Why the signing key was refused. The text never quotes the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not a PKCS#8 PEM private key.
    #[error("is not a PEM private key (expected -----BEGIN PRIVATE KEY-----, PKCS#8)")]
    NotPem,
    /// A PKCS#8 key, but not Ed25519 (or damaged).
    #[error("is not an Ed25519 private key in PKCS#8 PEM")]
    NotEd25519,
}

/// A minted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    /// The JWT.
    pub token: String,
    /// Its `exp`.
    pub expires_at: OffsetDateTime,
}

/// Why a token could not be minted (it never happens with a key that loaded).
#[derive(Debug, thiserror::Error)]
#[error("signing failed: {0}")]
pub struct SignError(#[from] jsonwebtoken::errors::Error);

#[derive(Serialize)]
struct Claims<'a> {
    sub: Uuid,
    iat: i64,
    exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    /// The device's registry groups: the gateways bind them like a token's own
    /// (docs/fleet.md).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
}

/// Signs device tokens. Its `Debug` shows the key id only.
#[derive(Clone)]
pub struct Signer {
    key: EncodingKey,
    kid: String,
    jwks: Vec<u8>,
    ttl: Duration,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from an Ed25519 PKCS#8 PEM key.
    pub fn new(
        pem: &str,
        ttl: Duration,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Result<Self, KeyError> {
        if !pem.contains("-----BEGIN") {
            return Err(KeyError::NotPem);
        }
        let key = EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|_| KeyError::NotEd25519)?;
        let pair = Ed25519KeyPair::from_pkcs8(key.as_bytes()).map_err(|_| KeyError::NotEd25519)?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let x = b64.encode(pair.public_key().as_ref());
        // RFC 7638: the required members, in lexicographic order, no whitespace.
        let thumbprint = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        let kid = b64.encode(Sha256::digest(thumbprint.as_bytes()));
        let jwks = serde_json::json!({
            "keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}]
        });
        Ok(Signer {
            key,
            kid,
            jwks: serde_json::to_vec(&jwks).expect("JSON serializes"),
            ttl,
            issuer,
            audience,
        })
    }

    /// The key id every minted token carries.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWKS document (JSON bytes).
    pub fn jwks(&self) -> &[u8] {
        &self.jwks
    }

    /// A token for `device`, valid for the configured lifetime. Its `iat` is after
    /// `revoked_at` (the device's latest revocation), so it survives that revocation
    /// even when minted within the same second.
    pub fn mint(
        &self,
        device: Uuid,
        revoked_at: Option<OffsetDateTime>,
        groups: &[String],
    ) -> Result<Minted, SignError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let iat = match revoked_at {
            Some(r) => now.max(r.unix_timestamp() + 1),
            None => now,
        };
        let exp = iat + self.ttl.as_secs() as i64;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let claims = Claims {
            sub: device,
            iat,
            exp,
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
            groups,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key)?;
        let expires_at =
            OffsetDateTime::from_unix_timestamp(exp).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Ok(Minted { token, expires_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};

    /// A test-only Ed25519 key (PKCS#8 v1).
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIIk+krOu6N+o1oPHb60D7w8Ntn2oILDTWP4oZuZ7BsZu\n\
        -----END PRIVATE KEY-----\n";

    #[test]
    fn minted_tokens_verify_with_the_published_key() {
        let s = Signer::new(
            KEY,
            Duration::from_secs(3600),
            Some("me".into()),
            Some("gw".into()),
        )
        .unwrap();
        let set: JwkSet = serde_json::from_slice(s.jwks()).unwrap();
        assert_eq!(set.keys[0].common.key_id.as_deref(), Some(s.kid()));
        let d = Uuid::new_v4();
        let revoked = OffsetDateTime::now_utc() + time::Duration::seconds(30);
        let m = s.mint(d, Some(revoked), &["site-7".into()]).unwrap();
        let key = DecodingKey::from_jwk(&set.keys[0]).unwrap();
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&["gw"]);
        v.set_issuer(&["me"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(&m.token, &key, &v).unwrap();
        assert_eq!(data.claims["sub"], d.to_string());
        assert!(data.claims["iat"].as_i64().unwrap() > revoked.unix_timestamp());
        assert_eq!(data.header.kid.as_deref(), Some(s.kid()));
    }

    #[test]
    fn other_keys_are_refused() {
        let rsa = mosaic_tests::token::RSA_PRIVATE_PEM;
        let ec = mosaic_tests::token::EC_PRIVATE_PEM;
        for (pem, want) in [
            ("nope", KeyError::NotPem),
            (rsa, KeyError::NotEd25519),
            (ec, KeyError::NotEd25519),
        ] {
            let e = Signer::new(pem, Duration::from_secs(60), None, None).unwrap_err();
            assert_eq!(e, want, "{pem}");
        }
    }
}
