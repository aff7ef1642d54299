//! The `X-Mosaic-Signature` header on deliveries to Hive:
//! `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
//!
//! A receiver recomputes the HMAC over the exact body bytes, compares in constant
//! time, and refuses a `t` too far from its own clock (replay protection). Several
//! `v1=` entries may be present (secret rotation); one match is enough.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header name.
pub const HEADER: &str = "X-Mosaic-Signature";

/// How far `t` may be from the receiver's clock by default, in seconds.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The header is absent.
    #[error("no {HEADER} header")]
    Missing,
    /// The header is not `t=<unix>,v1=<hex>`.
    #[error("malformed {HEADER} header")]
    Malformed,
    /// `t` is further than the tolerance from now.
    #[error("signature timestamp is {age_secs} s away from now")]
    Stale {
        /// The distance between `t` and now.
        age_secs: u64,
    },
    /// No `v1` matches the body.
    #[error("signature does not match the body")]
    Mismatch,
}

/// The header value for `body` signed with `secret` at `t`.
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
    let digest = mac(secret, t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(digest))
}

/// Checks `header` against `body` and `secret`, with `now` and `tolerance_secs`.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &[u8],
    now: u64,
    tolerance_secs: u64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<u64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => {
                candidates.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?)
            }
            Some(_) => {} // other schemes: ignored
            None => return Err(SignatureError::Malformed),
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let age_secs = now.abs_diff(t);
    if age_secs > tolerance_secs {
        return Err(SignatureError::Stale { age_secs });
    }
    // `verify_slice` compares in constant time.
    let matched = candidates
        .iter()
        .any(|c| mac(secret, t, body).verify_slice(c).is_ok());
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

fn mac(secret: &[u8], t: u64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"hive-signing-secret";
    const BODY: &[u8] = br#"{"kind":"event","name":"temp","data":{"c":21.5}}"#;
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_good_signature_is_accepted() {
        let h = sign(SECRET, NOW, BODY);
        assert!(h.starts_with(&format!("t={NOW},v1=")));
        assert_eq!(verify(Some(&h), BODY, SECRET, NOW, 300), Ok(()));
        // Clock skew within the tolerance, either way.
        assert_eq!(verify(Some(&h), BODY, SECRET, NOW + 300, 300), Ok(()));
        assert_eq!(verify(Some(&h), BODY, SECRET, NOW - 300, 300), Ok(()));
    }

    #[test]
    fn the_known_vector_matches() {
        // HMAC-SHA256(key "k", message "1.{}"), computed with another implementation.
        assert_eq!(
            sign(b"k", 1, b"{}"),
            "t=1,v1=3dd49b2593d0f9a349e9e71c4bde3e2b862c2be4003fe9b4ba81332029310158"
        );
    }

    #[test]
    fn tampered_old_or_malformed_signatures_are_refused() {
        let h = sign(SECRET, NOW, BODY);
        let tampered = br#"{"kind":"event","name":"temp","data":{"c":99.9}}"#;
        assert_eq!(
            verify(Some(&h), tampered, SECRET, NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(Some(&h), BODY, b"another-secret", NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(Some(&h), BODY, SECRET, NOW + 301, 300),
            Err(SignatureError::Stale { age_secs: 301 })
        );
        // A replayed header with its t rewritten no longer matches.
        let moved = h.replace(&format!("t={NOW}"), &format!("t={}", NOW + 1));
        assert_eq!(
            verify(Some(&moved), BODY, SECRET, NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(None, BODY, SECRET, NOW, 300),
            Err(SignatureError::Missing)
        );
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz", "garbage"] {
            assert_eq!(
                verify(Some(bad), BODY, SECRET, NOW, 300),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn any_matching_v1_is_enough() {
        let good = sign(SECRET, NOW, BODY);
        let v1 = good.split_once(",v1=").unwrap().1;
        let rotated = format!("t={NOW},v1={},v1={v1}", "00".repeat(32));
        assert_eq!(verify(Some(&rotated), BODY, SECRET, NOW, 300), Ok(()));
    }
}
