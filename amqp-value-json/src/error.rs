//! The one error type of the crate.

use std::fmt::Display;

/// Why a value could not be mapped between JSON (or a serde type) and AMQP.
///
/// Every variant names a property of the *input*: none of them is transient,
/// so retrying the same conversion gives the same error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A table key is longer than the 255 bytes an AMQP short string can hold.
    #[error("table key is {key_len} bytes long; AMQP table keys hold at most 255 bytes")]
    KeyTooLong {
        /// Length of the offending key, in bytes.
        key_len: usize,
    },
    /// An integer lies outside `i64::MIN..=u64::MAX`, the range AMQP can carry
    /// (only reachable through serde's 128-bit integers).
    #[error("integer is outside the range AMQP can carry (i64::MIN..=u64::MAX)")]
    IntegerOutOfRange,
    /// A float is NaN or infinite; JSON has no representation for it.
    #[error("float is NaN or infinite, which JSON cannot represent")]
    NonFiniteFloat,
    /// An AMQP long string is not valid UTF-8, so it cannot become a JSON string.
    #[error("AMQP long string is not valid UTF-8 (valid up to byte {valid_up_to})")]
    InvalidUtf8 {
        /// Number of leading bytes that are valid UTF-8.
        valid_up_to: usize,
    },
    /// Arrays and tables are nested deeper than [`MAX_DEPTH`](crate::MAX_DEPTH).
    #[error("value is nested deeper than {max_depth} arrays/tables")]
    TooDeep {
        /// The limit that was exceeded.
        max_depth: usize,
    },
    /// [`to_table`](crate::to_table) was given a value that does not serialize
    /// as a map or struct.
    #[error("value does not serialize as a map or struct, so it cannot become a field table")]
    NotATable,
    /// A map key serialized as something other than a string, char, integer or
    /// unit enum variant.
    #[error("map key must be a string, char, integer or unit enum variant")]
    KeyNotString,
    /// A message from a `Serialize` or `Deserialize` implementation (for example
    /// a missing struct field or a type mismatch).
    #[error("{0}")]
    Custom(String),
}

impl serde::ser::Error for Error {
    fn custom<T: Display>(msg: T) -> Self {
        Error::Custom(msg.to_string())
    }
}

impl serde::de::Error for Error {
    fn custom<T: Display>(msg: T) -> Self {
        Error::Custom(msg.to_string())
    }
}
