//! JWT minting for tests: an HMAC secret and fixed test-only key pairs (RSA, P-256,
//! Ed25519), their public keys as PEM and as a JWKS document.
//!
//! These keys exist only to test signature checks; they protect nothing.

/// RSA private key (PKCS#8), signs RS256 test tokens.
pub const RSA_PRIVATE_PEM: &str = r"-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCiZ5i7qwpbpP/y
rUZi1eQMGg3c51giAmdmxLXlkJd4LnIqd3D+jBJMVBEnMCscpFoJguXZPssZVu+1
EJJN5wSwn/di2be5tVjxhNW44z1oStEPu2nb19DoolmEv+ZjBdxxdytePIis7rA4
5GPGsERFFI4/JvkEiejUwZUyZ+J30x1Q5tA5YQnQKjjtu64sGwOEZJ6dcxgWbSxi
HuIehb2D2QPXAN46IMQxTbgOJoMMZL4G5Hkdjx0Ksbzl8GSqhJXA/EEQ7mS6cjEN
nrJXLlhNOFqOeQ7a9KIFbnZKUSe4jVn2RosdAw846Wg+Za34DEtpQ6HlDhWzIO+p
fBk9jQO9AgMBAAECggEABIaznINbUguKsJZAsG96oBW3zjDKZYRAon4X/bJmbkyJ
FQLoLMf1mJf9NGTkxrMT6VDzG/dijK2+F4NDOJWYLV3/9IrR0oSp2m1T0YfPxdDT
+8bC4AQnR9yCdy8r+hWHO8hQ9prkSkGKusMuvrJZ7Lzya/MnnIdFbGyKvnFjv+gg
dFUkaFx8g+Ih3HKOVy/JOdMH0Q3ZEw1+rHt7cmCcFiSJ4yxdA+5gzYsu+y0lLws2
fw+2ru2XkKITQmRPMqtdOFKZ9BvCBw2Ubpp2uFR3Opf6DlLgx6WFpu7hAF8Cyhxf
Y2uACPG1aAwFUpWCfW3wHQU364lcWSU+/SVIeIHiNwKBgQDaJC9KFFJs/D2otz4b
DUUZK8ma0IrmA2zq0du84gTUw5m/PBwY8JVLDrtzp4R7h4nKrk9Wfg1AI+bOdML/
pJ9ZPgsKIsPDno3z8tey7EgBLzZhFvwl5SX8gTe4kOgHQ646U/XBXhxVZLsboOsm
7bXpUGm2lDH/Lh8wa0nRK5Q5/wKBgQC+lxV3f2d9lzb0EJbVPcr+yzgu4ytQStg1
g1iHk9CGQQkXp4r49u+nZf1YUrZxLBRFFxlXO5sFuewYEukx3jjJWEn3aLSqqo7i
U3x1P/wyYyWxqdBuG4mlhdJBphEnlmq4yV2MgQ6fO6DTyJnXtdTwyNgbARHs0kqK
axRFb8IqQwKBgQDUb6659uZ6in9FogZSc+7Z34G7SeIqtCVK3UqgPIA177L3wIMg
apMJgHRe4kGrx0gSYQSUl7cxwoTQhHcuXNRuJXS8zzRUekGF0/Xpoh9RP/g2PxsZ
kHoY2II6NKwx/uBan09Sm+L96lYpRuIajB6+83evvcye1Py8u48sq8LzYwKBgFSt
z+3d/18/ljzuOfXYlJ6MMBQ0/oOYHWP5TZY/SIC92IpX+FkRbf1URTG+3ix+RytD
ThEB/KiYqJsxm8Z6U4Sx43s3XD4PtZg9O6jkmurQPmknZ+Hj/k46nOZqIGkUXapo
XVYV6Sc6WQR/tkqvEUNCGTI2UX6FGHVTihgnxX79AoGAPEgqkFHJUQ5r0xWpBCma
Q7kvc16ARZZGgpGWov++c3DpW09DYGztbQao/B8jKK32IHm/gFhqOiQEYeXpO6SO
y+jz+a+GdJO4LDym9LDXiaqNr9dXa+LQecB+b3JJfPgJf6/BM+dNRUpTWPaxktcq
oKyNYru1cAtzMHhlcgM4hPU=
-----END PRIVATE KEY-----
";

/// RSA public key (SPKI).
pub const RSA_PUBLIC_PEM: &str = r"-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAomeYu6sKW6T/8q1GYtXk
DBoN3OdYIgJnZsS15ZCXeC5yKndw/owSTFQRJzArHKRaCYLl2T7LGVbvtRCSTecE
sJ/3Ytm3ubVY8YTVuOM9aErRD7tp29fQ6KJZhL/mYwXccXcrXjyIrO6wOORjxrBE
RRSOPyb5BIno1MGVMmfid9MdUObQOWEJ0Co47buuLBsDhGSenXMYFm0sYh7iHoW9
g9kD1wDeOiDEMU24DiaDDGS+BuR5HY8dCrG85fBkqoSVwPxBEO5kunIxDZ6yVy5Y
TThajnkO2vSiBW52SlEnuI1Z9kaLHQMPOOloPmWt+AxLaUOh5Q4VsyDvqXwZPY0D
vQIDAQAB
-----END PUBLIC KEY-----
";

/// P-256 private key (PKCS#8), signs ES256 test tokens.
pub const EC_PRIVATE_PEM: &str = r"-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJLglApRbHC4W96CP
k8sAFAIrykjbX5sdM7rReZiGvUOhRANCAATBbeLMSzgT1VoaxrcPd+gthnVg1Efm
05SXP40RJDEvRu3HhVSYHXfpLxlZ13OWT1vYpTRCRx8XjPMuFNH0gd8j
-----END PRIVATE KEY-----
";

/// P-256 public key (SPKI).
pub const EC_PUBLIC_PEM: &str = r"-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEwW3izEs4E9VaGsa3D3foLYZ1YNRH
5tOUlz+NESQxL0btx4VUmB136S8ZWddzlk9b2KU0QkcfF4zzLhTR9IHfIw==
-----END PUBLIC KEY-----
";

/// Ed25519 private key (PKCS#8), signs EdDSA test tokens.
pub const ED_PRIVATE_PEM: &str = r"-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIIk+krOu6N+o1oPHb60D7w8Ntn2oILDTWP4oZuZ7BsZu
-----END PRIVATE KEY-----
";

/// Ed25519 public key (SPKI).
pub const ED_PUBLIC_PEM: &str = r"-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAYC9U+ocjhnVk6P21GIkR2gS4hCE+m+Fdm2XGUodMHXk=
-----END PUBLIC KEY-----
";

/// The three public keys as a JWKS document, with kids `rsa-1`, `ec-1` and `ed-1`.
pub const JWKS: &str = r#"{
  "keys": [
    {
      "kty": "RSA",
      "kid": "rsa-1",
      "use": "sig",
      "alg": "RS256",
      "n": "omeYu6sKW6T_8q1GYtXkDBoN3OdYIgJnZsS15ZCXeC5yKndw_owSTFQRJzArHKRaCYLl2T7LGVbvtRCSTecEsJ_3Ytm3ubVY8YTVuOM9aErRD7tp29fQ6KJZhL_mYwXccXcrXjyIrO6wOORjxrBERRSOPyb5BIno1MGVMmfid9MdUObQOWEJ0Co47buuLBsDhGSenXMYFm0sYh7iHoW9g9kD1wDeOiDEMU24DiaDDGS-BuR5HY8dCrG85fBkqoSVwPxBEO5kunIxDZ6yVy5YTThajnkO2vSiBW52SlEnuI1Z9kaLHQMPOOloPmWt-AxLaUOh5Q4VsyDvqXwZPY0DvQ",
      "e": "AQAB"
    },
    {
      "kty": "EC",
      "kid": "ec-1",
      "use": "sig",
      "alg": "ES256",
      "crv": "P-256",
      "x": "wW3izEs4E9VaGsa3D3foLYZ1YNRH5tOUlz-NESQxL0Y",
      "y": "7ceFVJgdd-kvGVnXc5ZPW9ilNEJHHxeM8y4U0fSB3yM"
    },
    {
      "kty": "OKP",
      "kid": "ed-1",
      "use": "sig",
      "alg": "EdDSA",
      "crv": "Ed25519",
      "x": "YC9U-ocjhnVk6P21GIkR2gS4hCE-m-Fdm2XGUodMHXk"
    }
  ]
}"#;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use uuid::Uuid;

/// HMAC secret the tests configure as `JWT_SECRET` (40 bytes).
pub const SECRET: &str = "mosaic-test-secret-0123456789-abcdefghij";

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The usual claims: `sub` = `device`, `exp` = now + `ttl_secs`, `iat` = now.
pub fn claims(device: Uuid, ttl_secs: i64) -> Value {
    json!({"sub": device.to_string(), "exp": now() + ttl_secs, "iat": now()})
}

/// An HS256 token for `device`, valid for `ttl_secs`, signed with [`SECRET`].
pub fn hs256(device: Uuid, ttl_secs: i64) -> String {
    sign(Algorithm::HS256, None, &claims(device, ttl_secs))
}

/// Signs `claims` with the test key of `alg`'s family (HMAC with [`SECRET`], or the
/// RSA, P-256 or Ed25519 test key), putting `kid` in the header when given.
pub fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(SECRET.as_bytes())
        }
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
            EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("test RSA key")
        }
        Algorithm::ES256 => {
            EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).expect("test EC key")
        }
        Algorithm::EdDSA => {
            EncodingKey::from_ed_pem(ED_PRIVATE_PEM.as_bytes()).expect("test Ed key")
        }
        other => panic!("no test key for {other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).expect("test tokens always encode")
}

/// An unsigned token (`alg: none`) with `claims`.
pub fn unsigned(claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_test_key_signs() {
        let c = claims(Uuid::new_v4(), 60);
        for alg in [
            Algorithm::HS256,
            Algorithm::RS256,
            Algorithm::ES256,
            Algorithm::EdDSA,
        ] {
            assert_eq!(sign(alg, None, &c).split('.').count(), 3);
        }
        let jwks: Value = serde_json::from_str(JWKS).unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 3);
    }
}
