//! Device JWTs: what the gateway accepts (see the protocol docs), minted here for
//! operators, Hive developers and the simulator.
//!
//! A token carries `sub` (the device UUID), `iat`, `exp`, and `aud`/`iss` when given.
//! It is signed with an HMAC secret (HS256, HS384, HS512) or a private key in PEM
//! (RS256/384/512, ES256/384, EdDSA); the algorithm of a key is found from the key
//! unless given.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The shortest HMAC secret accepted, in bytes (the gateway refuses shorter ones too).
pub const MIN_SECRET_BYTES: usize = 32;

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The HMAC secret is shorter than [`MIN_SECRET_BYTES`].
    #[error("the secret must be at least {MIN_SECRET_BYTES} bytes long")]
    ShortSecret,
    /// The algorithm does not fit the key (e.g. RS256 with an HMAC secret).
    #[error("algorithm {alg:?} cannot be used with {key}")]
    AlgorithmMismatch {
        /// The algorithm asked for.
        alg: Algorithm,
        /// What kind of key was given.
        key: &'static str,
    },
    /// The PEM is not a private RSA, EC (PKCS#8) or Ed25519 (PKCS#8) key.
    #[error(
        "the key is not a private RSA, EC or Ed25519 key in PEM (EC and Ed25519 keys must be PKCS#8)"
    )]
    UnknownKey,
    /// A key or secret file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// jsonwebtoken refused to sign.
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// The claims of a device token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The device UUID.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Audience, when the gateway checks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Issuer, when the gateway checks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The device's groups (see docs/fleet.md), when it has any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// A key to sign with, and its algorithm.
#[derive(Clone)]
pub struct Signer {
    alg: Algorithm,
    key: EncodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// An HMAC signer; `alg` defaults to HS256.
    pub fn hmac(secret: &[u8], alg: Option<Algorithm>) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TokenError::ShortSecret);
        }
        let alg = alg.unwrap_or(Algorithm::HS256);
        if !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(TokenError::AlgorithmMismatch {
                alg,
                key: "an HMAC secret",
            });
        }
        Ok(Signer {
            alg,
            key: EncodingKey::from_secret(secret),
        })
    }

    /// A signer from a private key in PEM. Without `alg`: RS256 for RSA, ES256 for EC,
    /// EdDSA for Ed25519.
    pub fn pem(pem: &[u8], alg: Option<Algorithm>) -> Result<Self, TokenError> {
        use Algorithm::*;
        let (key, default, allowed, kind): (_, _, &[Algorithm], _) =
            if let Ok(k) = EncodingKey::from_rsa_pem(pem) {
                (
                    k,
                    RS256,
                    &[RS256, RS384, RS512, PS256, PS384, PS512],
                    "an RSA key",
                )
            } else if let Ok(k) = EncodingKey::from_ec_pem(pem) {
                (k, ES256, &[ES256, ES384], "an EC key")
            } else if let Ok(k) = EncodingKey::from_ed_pem(pem) {
                (k, EdDSA, &[EdDSA], "an Ed25519 key")
            } else {
                return Err(TokenError::UnknownKey);
            };
        let alg = alg.unwrap_or(default);
        if !allowed.contains(&alg) {
            return Err(TokenError::AlgorithmMismatch { alg, key: kind });
        }
        Ok(Signer { alg, key })
    }

    /// The algorithm tokens are signed with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// Where the key comes from, as given on a command line (a flag group both
/// `mosaic-token` and `mosaic-device` flatten into their arguments).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeySource {
    /// A private key in PEM: RSA (RS256), EC P-256 in PKCS#8 (ES256) or Ed25519 in
    /// PKCS#8 (EdDSA). Beats --secret and --secret-file.
    #[arg(long = "key")]
    pub key_file: Option<std::path::PathBuf>,
    /// A file holding the HMAC secret (one trailing newline is ignored); beats
    /// --secret.
    #[arg(long)]
    pub secret_file: Option<std::path::PathBuf>,
    /// HMAC secret (at least 32 bytes), as in the gateway's JWT_SECRET.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The algorithm, when not the key's default: HS256, HS384, HS512, RS256, RS384,
    /// RS512, PS256, ES256, ES384, EdDSA.
    #[arg(long, value_parser = parse_algorithm)]
    pub alg: Option<Algorithm>,
}

impl KeySource {
    /// The signer, or `None` when no key was given.
    pub fn signer(&self) -> Result<Option<Signer>, TokenError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| TokenError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        if let Some(path) = &self.key_file {
            return Signer::pem(&read(path)?, self.alg).map(Some);
        }
        if let Some(path) = &self.secret_file {
            let text = read(path)?;
            let secret = text.strip_suffix(b"\n").unwrap_or(&text);
            return Signer::hmac(secret, self.alg).map(Some);
        }
        match &self.secret {
            Some(secret) => Signer::hmac(secret.as_bytes(), self.alg).map(Some),
            None => Ok(None),
        }
    }
}

/// What to put in a token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// The device.
    pub sub: Uuid,
    /// How long the token is valid from now.
    pub ttl: Duration,
    /// `kid` header, to pick a key on the gateway.
    pub kid: Option<String>,
    /// `aud` claim.
    pub aud: Option<String>,
    /// `iss` claim.
    pub iss: Option<String>,
    /// `groups` claim (omitted when empty).
    pub groups: Vec<String>,
}

impl TokenSpec {
    /// A spec for `sub` valid for `ttl`, without `kid`, `aud` or `iss`.
    pub fn new(sub: Uuid, ttl: Duration) -> Self {
        TokenSpec {
            sub,
            ttl,
            kid: None,
            aud: None,
            iss: None,
            groups: Vec::new(),
        }
    }

    /// The claims this spec gives at `now`.
    pub fn claims(&self, now: SystemTime) -> Claims {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Claims {
            sub: self.sub.to_string(),
            iat,
            exp: iat.saturating_add(self.ttl.as_secs().max(1)),
            aud: self.aud.clone(),
            iss: self.iss.clone(),
            groups: self.groups.clone(),
        }
    }
}

/// Mints a token for `spec`, valid from now.
pub fn mint(signer: &Signer, spec: &TokenSpec) -> Result<String, TokenError> {
    mint_at(signer, spec, SystemTime::now())
}

/// Mints a token for `spec` as if issued at `now`.
pub fn mint_at(signer: &Signer, spec: &TokenSpec, now: SystemTime) -> Result<String, TokenError> {
    let mut header = Header::new(signer.alg);
    header.kid = spec.kid.clone();
    Ok(jsonwebtoken::encode(
        &header,
        &spec.claims(now),
        &signer.key,
    )?)
}

/// Parses an algorithm name (`HS256`, `RS256`, `ES256`, `EdDSA`, ...), case-insensitively.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    use std::str::FromStr;
    let canonical = if name.eq_ignore_ascii_case("eddsa") {
        "EdDSA".to_owned()
    } else {
        name.to_ascii_uppercase()
    };
    Algorithm::from_str(&canonical).map_err(|_| format!("unknown algorithm {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};

    const SECRET: &[u8] = b"an-hmac-secret-of-at-least-32-bytes!";

    // Test-only keys, generated for these tests and used nowhere else.
    const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgn7xdOXiqSPp9V3Yz
hE/mZPuqFWfdwjRGNR7inUZQ1fihRANCAASOYUbDJobUPp28jxSrQy13eyuJbJfx
UBr4znebpDxHbweHmoAAE4Y00fUUuQdTFnm4+pfqEx8pFv3wj4ktoldD
-----END PRIVATE KEY-----
";
    const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEjmFGwyaG1D6dvI8Uq0Mtd3sriWyX
8VAa+M53m6Q8R28Hh5qAABOGNNH1FLkHUxZ5uPqX6hMfKRb98I+JLaJXQw==
-----END PUBLIC KEY-----
";
    const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEICuyMIZ2y1pUXTVrT2TgJjZLyiBcO7y557LyScDP/08Y
-----END PRIVATE KEY-----
";
    const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAvkOYO+Z/i2/CdoNYG4LseEnEsyC/PIqN/BoMRXKmu+M=
-----END PUBLIC KEY-----
";

    fn spec() -> TokenSpec {
        TokenSpec {
            sub: Uuid::new_v4(),
            ttl: Duration::from_secs(3600),
            kid: Some("k1".into()),
            aud: Some("mosaic".into()),
            iss: Some("ops".into()),
            groups: vec!["site-7".into()],
        }
    }

    fn validation(alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = 0;
        v.set_audience(&["mosaic"]);
        v.set_issuer(&["ops"]);
        v.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        v
    }

    #[test]
    fn hmac_tokens_verify_with_their_claims() {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let signer = Signer::hmac(SECRET, Some(alg)).unwrap();
            let spec = spec();
            let token = mint(&signer, &spec).unwrap();
            let header = decode_header(&token).unwrap();
            assert_eq!(header.alg, alg);
            assert_eq!(header.kid.as_deref(), Some("k1"));
            let data =
                decode::<Claims>(&token, &DecodingKey::from_secret(SECRET), &validation(alg))
                    .unwrap();
            assert_eq!(data.claims.sub, spec.sub.to_string());
            assert_eq!(data.claims.exp - data.claims.iat, 3600);
            assert_eq!(data.claims.groups, ["site-7"]);
            // Another secret does not verify it.
            let other = DecodingKey::from_secret(b"another-secret-another-secret-xx");
            assert!(decode::<Claims>(&token, &other, &validation(alg)).is_err());
        }
    }

    #[test]
    fn key_tokens_verify_with_the_public_key() {
        let signer = Signer::pem(EC_PRIVATE.as_bytes(), None).unwrap();
        assert_eq!(signer.algorithm(), Algorithm::ES256);
        let token = mint(&signer, &spec()).unwrap();
        let key = DecodingKey::from_ec_pem(EC_PUBLIC.as_bytes()).unwrap();
        decode::<Claims>(&token, &key, &validation(Algorithm::ES256)).unwrap();

        let signer = Signer::pem(ED_PRIVATE.as_bytes(), None).unwrap();
        assert_eq!(signer.algorithm(), Algorithm::EdDSA);
        let token = mint(&signer, &spec()).unwrap();
        let key = DecodingKey::from_ed_pem(ED_PUBLIC.as_bytes()).unwrap();
        decode::<Claims>(&token, &key, &validation(Algorithm::EdDSA)).unwrap();
    }

    #[test]
    fn expired_tokens_are_expired() {
        let signer = Signer::hmac(SECRET, None).unwrap();
        let long_ago = SystemTime::now() - Duration::from_secs(7200);
        let token = mint_at(&signer, &spec(), long_ago).unwrap();
        let err = decode::<Claims>(
            &token,
            &DecodingKey::from_secret(SECRET),
            &validation(Algorithm::HS256),
        )
        .unwrap_err();
        assert_eq!(
            err.kind(),
            &jsonwebtoken::errors::ErrorKind::ExpiredSignature
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(matches!(
            Signer::hmac(b"short", None),
            Err(TokenError::ShortSecret)
        ));
        assert!(matches!(
            Signer::hmac(SECRET, Some(Algorithm::RS256)),
            Err(TokenError::AlgorithmMismatch { .. })
        ));
        assert!(matches!(
            Signer::pem(EC_PRIVATE.as_bytes(), Some(Algorithm::RS256)),
            Err(TokenError::AlgorithmMismatch { .. })
        ));
        assert!(matches!(
            Signer::pem(b"not a key", None),
            Err(TokenError::UnknownKey)
        ));
        assert!(matches!(
            Signer::pem(EC_PUBLIC.as_bytes(), None),
            Err(TokenError::UnknownKey)
        ));
        assert_eq!(parse_algorithm("eddsa").unwrap(), Algorithm::EdDSA);
        assert_eq!(parse_algorithm("hs512").unwrap(), Algorithm::HS512);
        assert!(parse_algorithm("none").is_err());
    }
}
