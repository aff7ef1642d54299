//! Bearer tokens on `/v1`, compared in constant time.
//!
//! Tokens are kept only as SHA-256 digests; a presented token is hashed and compared
//! with every digest with `subtle`, without stopping at the first match, so neither
//! the tokens' contents nor their lengths leak through timing.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::error::{ApiError, code};

/// The accepted tokens, as digests. Its `Debug` shows only how many there are.
#[derive(Clone)]
pub struct Tokens(Vec<[u8; 32]>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl Tokens {
    /// Digests of `tokens`.
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Self {
        Tokens(
            tokens
                .into_iter()
                .map(|t| Sha256::digest(t.as_bytes()).into())
                .collect(),
        )
    }

    /// Whether `presented` is one of the tokens.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut ok = Choice::from(0);
        for t in &self.0 {
            ok |= t.ct_eq(&digest);
        }
        ok.into()
    }
}

/// Middleware: 401 unless `Authorization: Bearer <one of the tokens>`.
pub async fn require_token(
    State(tokens): State<Tokens>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(t) if tokens.accepts(t) => Ok(next.run(req).await),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            code::UNAUTHORIZED,
            "a valid `Authorization: Bearer <token>` header is required",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_tokens() {
        let t = Tokens::new(["first-token-0123456", "second-token-012345"]);
        assert!(t.accepts(b"first-token-0123456"));
        assert!(t.accepts(b"second-token-012345"));
        assert!(!t.accepts(b"first-token-012345"));
        assert!(!t.accepts(b""));
        assert!(!format!("{t:?}").contains("first"));
    }
}
