use std::fmt;

/// Errors of the numeric core. The R front-end validates inputs first, so these
/// are a second line of defence; their messages still name what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub enum CoreError {
    /// An argument is out of its domain: (argument, explanation).
    InvalidArgument(&'static str, String),
    /// Client updates do not fit together: (client index, 0-based, explanation).
    Client(usize, String),
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::InvalidArgument(arg, msg) => write!(f, "`{arg}`: {msg}"),
            CoreError::Client(k, msg) => write!(f, "client {}: {msg}", k + 1),
        }
    }
}

impl std::error::Error for CoreError {}

pub type CoreResult<T> = Result<T, CoreError>;

pub(crate) fn invalid<T>(arg: &'static str, msg: impl Into<String>) -> CoreResult<T> {
    Err(CoreError::InvalidArgument(arg, msg.into()))
}
