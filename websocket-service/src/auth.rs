//! Device tokens: JWT verification against a fixed set of keys.
//!
//! Keys come from `JWT_SECRET` (HMAC) and `JWT_PUBLIC_KEYS` (a PEM file with one
//! public key, used for tokens without `kid`, or a JWKS file whose keys are chosen by
//! `kid`). The token's `alg` must belong to the chosen key's family, so `alg: none`
//! and algorithm/key-type confusion are refused. `exp` and `sub` (a UUID) are always
//! required; `aud` and `iss` are required and checked when configured; `nbf` is
//! honoured; the leeway is `JWT_LEEWAY_SECS`. An optional `groups` claim names the
//! device's groups (`mosaic_protocol::fleet::parse_groups`): anything but an array of
//! valid names, `null` or nothing refuses the token as bad claims.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use uuid::Uuid;

/// The longest token examined, in bytes; longer ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why the key material could not be loaded at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no usable key.
    #[error("{0}")]
    Invalid(String),
}

/// Why a token was refused. [`AuthError::as_str`] is the metric label and log field;
/// the text (`Display`) is what the device is told: the `message` of its
/// `unauthorized` error frame, or of the 401 body when the token came in the
/// `Authorization` header. The texts are fixed: they never quote the token, a claim
/// or a key, and they say no more than which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a well-formed JWT, or too long.
    #[error("malformed token")]
    Malformed,
    /// `alg` is not accepted for the key (or no key of that family is configured).
    #[error("algorithm not accepted")]
    Algorithm,
    /// `kid` names no configured key.
    #[error("unknown key id")]
    UnknownKey,
    /// The signature does not verify.
    #[error("invalid signature")]
    Signature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// A required claim is missing, or `aud`/`iss`/`sub` is wrong.
    #[error("invalid claims")]
    Claims,
    /// The device was disabled or deleted after this token was issued (its `iat`),
    /// or the token has no `iat` and the device was ever revoked.
    #[error("token revoked")]
    Revoked,
}

impl AuthError {
    /// A snake_case label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthError::Malformed => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Claims => "claims",
            AuthError::Revoked => "revoked",
        }
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The device (`sub`).
    pub device: Uuid,
    /// `exp`, seconds since the Unix epoch.
    pub exp: u64,
    /// The `groups` claim: sorted, each once; empty when absent or `null`.
    pub groups: Vec<String>,
    /// `iat`, seconds since the Unix epoch, when the token has one.
    pub iat: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
}

impl Family {
    fn accepts(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (
                Family::Rsa,
                Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512
            ) | (Family::Ec, Algorithm::ES256 | Algorithm::ES384)
                | (Family::Ed, Algorithm::EdDSA)
        )
    }
}

/// Verifies device tokens. Built once at start; cheap to share.
pub struct Verifier {
    hmac: Option<DecodingKey>,
    by_kid: HashMap<String, (Family, DecodingKey)>,
    default_key: Option<(Family, DecodingKey)>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hmac", &self.hmac.is_some())
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .field("default_key", &self.default_key.as_ref().map(|k| k.0))
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(default)]
#[derive(Default)]
struct Claims {
    sub: String,
    exp: u64,
    groups: Option<serde_json::Value>,
    iat: Option<u64>,
}

/// Where a [`Verifier`]'s keys come from and what the claims must say
/// (`JWT_SECRET`, `JWT_PUBLIC_KEYS`, `JWT_AUDIENCE`, `JWT_ISSUER`, `JWT_LEEWAY_SECS`).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeySettings<'a> {
    /// The HMAC secret.
    pub secret: Option<&'a str>,
    /// A PEM or JWKS file of public keys.
    pub public_keys: Option<&'a Path>,
    /// The required `aud`.
    pub audience: Option<&'a str>,
    /// The required `iss`.
    pub issuer: Option<&'a str>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl Verifier {
    /// The clock skew allowed on `exp` and `nbf`, in seconds (`JWT_LEEWAY_SECS`): a
    /// session accepted within it lasts until `exp` plus the leeway.
    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    /// Loads the keys `settings` name.
    pub fn new(settings: KeySettings<'_>) -> Result<Self, KeyError> {
        let mut v = Verifier {
            hmac: settings
                .secret
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            by_kid: HashMap::new(),
            default_key: None,
            audience: settings.audience.map(str::to_owned),
            issuer: settings.issuer.map(str::to_owned),
            leeway: settings.leeway_secs,
        };
        if let Some(path) = settings.public_keys {
            v.load_public_keys(path)?;
        }
        Ok(v)
    }

    fn load_public_keys(&mut self, path: &Path) -> Result<(), KeyError> {
        let text = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if text.trim_ascii_start().starts_with(b"{") {
            let set: JwkSet = serde_json::from_slice(&text)
                .map_err(|e| KeyError::Invalid(format!("not a JWKS document: {e}")))?;
            for jwk in &set.keys {
                let kid = jwk
                    .common
                    .key_id
                    .clone()
                    .ok_or_else(|| KeyError::Invalid("a JWKS key has no `kid`".into()))?;
                let family = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Family::Rsa,
                    AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                    AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
                    _ => {
                        return Err(KeyError::Invalid(format!(
                            "key {kid}: only RSA, EC and OKP (Ed25519) public keys; HMAC secrets belong in JWT_SECRET"
                        )));
                    }
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| KeyError::Invalid(format!("key {kid}: {e}")))?;
                self.by_kid.insert(kid, (family, key));
            }
            if self.by_kid.is_empty() {
                return Err(KeyError::Invalid("the JWKS holds no keys".into()));
            }
        } else {
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(&text) {
                (Family::Rsa, k)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&text) {
                (Family::Ec, k)
            } else if let Ok(k) = DecodingKey::from_ed_pem(&text) {
                (Family::Ed, k)
            } else {
                return Err(KeyError::Invalid(
                    "not a PEM RSA, EC or Ed25519 public key, nor a JWKS document".into(),
                ));
            };
            self.default_key = Some(key);
        }
        Ok(())
    }

    /// Verifies `token` and returns the device it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind as K;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let alg = header.alg;
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                self.hmac.as_ref().ok_or(AuthError::Algorithm)?
            }
            _ => {
                let (family, key) = match &header.kid {
                    Some(kid) => self.by_kid.get(kid).ok_or(AuthError::UnknownKey)?,
                    None => self.default_key.as_ref().ok_or(AuthError::UnknownKey)?,
                };
                if !family.accepts(alg) {
                    return Err(AuthError::Algorithm);
                }
                key
            }
        };
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.leeway = self.leeway;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(aud) = &self.audience {
            v.set_audience(&[aud]);
            required.push("aud");
        } else {
            v.validate_aud = false;
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
            K::ExpiredSignature => AuthError::Expired,
            K::ImmatureSignature => AuthError::NotYetValid,
            K::InvalidSignature => AuthError::Signature,
            K::InvalidAlgorithm | K::InvalidAlgorithmName | K::InvalidKeyFormat => {
                AuthError::Algorithm
            }
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => AuthError::Malformed,
            _ => AuthError::Claims,
        })?;
        let device = Uuid::parse_str(&data.claims.sub).map_err(|_| AuthError::Claims)?;
        let groups = mosaic_protocol::fleet::parse_groups(data.claims.groups.as_ref())
            .map_err(|_| AuthError::Claims)?;
        Ok(Identity {
            device,
            exp: data.claims.exp,
            groups,
            iat: data.claims.iat,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier(aud: Option<&str>, iss: Option<&str>) -> Verifier {
        Verifier {
            hmac: Some(DecodingKey::from_secret(SECRET.as_bytes())),
            by_kid: HashMap::new(),
            default_key: None,
            audience: aud.map(Into::into),
            issuer: iss.map(Into::into),
            leeway: 0,
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_good_token_names_its_device() {
        let d = Uuid::new_v4();
        let id = verifier(None, None)
            .verify(&hs(json!({"sub": d, "exp": now() + 60})))
            .unwrap();
        assert_eq!(id.device, d);
    }

    #[test]
    fn the_groups_claim_is_an_array_of_names_or_nothing() {
        let d = Uuid::new_v4();
        let v = verifier(None, None);
        let exp = now() + 60;
        for (groups, want) in [
            (json!(null), Some(vec![])),
            (
                json!(["b", "a"]),
                Some(vec!["a".to_owned(), "b".to_owned()]),
            ),
            (json!([]), Some(vec![])),
            (json!("a"), None),
            (json!(["a.b"]), None),
            (json!([1]), None),
            (json!({"a": 1}), None),
        ] {
            let got = v.verify(&hs(json!({"sub": d, "exp": exp, "groups": groups})));
            match want {
                Some(g) => assert_eq!(got.unwrap().groups, g, "{groups}"),
                None => assert_eq!(got.unwrap_err(), AuthError::Claims, "{groups}"),
            }
        }
        let id = v.verify(&hs(json!({"sub": d, "exp": exp}))).unwrap();
        assert!(id.groups.is_empty());
    }

    #[test]
    fn required_claims_and_checks() {
        let d = Uuid::new_v4().to_string();
        let v = verifier(Some("gw"), Some("me"));
        let ok = json!({"sub": d, "exp": now() + 60, "aud": "gw", "iss": "me"});
        v.verify(&hs(ok)).unwrap();
        for (claims, why) in [
            (
                json!({"sub": d, "aud": "gw", "iss": "me"}),
                AuthError::Claims,
            ),
            (
                json!({"exp": now() + 60, "aud": "gw", "iss": "me"}),
                AuthError::Claims,
            ),
            (
                json!({"sub": "not-a-uuid", "exp": now() + 60, "aud": "gw", "iss": "me"}),
                AuthError::Claims,
            ),
            (
                json!({"sub": d, "exp": now() + 60, "iss": "me"}),
                AuthError::Claims,
            ),
            (
                json!({"sub": d, "exp": now() + 60, "aud": "gw"}),
                AuthError::Claims,
            ),
            (
                json!({"sub": d, "exp": now() + 60, "aud": "gw", "iss": "other"}),
                AuthError::Claims,
            ),
            (
                json!({"sub": d, "exp": now() - 10, "aud": "gw", "iss": "me"}),
                AuthError::Expired,
            ),
            (
                json!({"sub": d, "exp": now() + 60, "nbf": now() + 30, "aud": "gw", "iss": "me"}),
                AuthError::NotYetValid,
            ),
        ] {
            assert_eq!(v.verify(&hs(claims.clone())), Err(why), "{claims}");
        }
    }

    /// The largest `JWT_LEEWAY_SECS` still verifies tokens and still refuses the
    /// ones past it (`u64::MAX` used to overflow the expiry check).
    #[test]
    fn the_largest_leeway_works() {
        let max = crate::config::MAX_JWT_LEEWAY_SECS;
        let v = Verifier {
            leeway: max,
            ..verifier(None, None)
        };
        let d = Uuid::new_v4();
        v.verify(&hs(json!({"sub": d, "exp": now() + 60}))).unwrap();
        v.verify(&hs(json!({"sub": d, "exp": now() - max + 30})))
            .unwrap();
        v.verify(&hs(
            json!({"sub": d, "exp": now() + 60, "nbf": now() + max - 30}),
        ))
        .unwrap();
        assert_eq!(
            v.verify(&hs(json!({"sub": d, "exp": now() - max - 30}))),
            Err(AuthError::Expired)
        );
        assert_eq!(
            v.verify(&hs(
                json!({"sub": d, "exp": now() + 60, "nbf": now() + max + 30})
            )),
            Err(AuthError::NotYetValid)
        );
    }

    #[test]
    fn alg_none_and_garbage_are_refused() {
        let v = verifier(None, None);
        // {"alg":"none","typ":"JWT"} . {"sub":..,"exp":..} . (no signature)
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let head = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(json!({"sub": Uuid::new_v4(), "exp": now() + 60}).to_string());
        assert!(v.verify(&format!("{head}.{body}.")).is_err());
        assert_eq!(v.verify("x.y.z"), Err(AuthError::Malformed));
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn public_key_algorithms_need_a_configured_key() {
        let v = verifier(None, None);
        let head = Header {
            alg: Algorithm::RS256,
            ..Header::default()
        };
        // Signed with the HMAC secret but claiming RS256: there is no RSA key.
        let t = encode(
            &Header::default(),
            &json!({"sub": Uuid::new_v4(), "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let mut parts: Vec<&str> = t.split('.').collect();
        use base64::Engine as _;
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&head).unwrap());
        parts[0] = &forged;
        assert_eq!(v.verify(&parts.join(".")), Err(AuthError::UnknownKey));
    }
}
