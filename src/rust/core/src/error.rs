use std::fmt;

/// Errors of the numeric core. The R front-end validates inputs first, so these
/// are a second line of defence; their messages still name what is wrong.
/// `kind()` sorts them into the classes the R side raises as conditions.
#[derive(Debug, Clone, PartialEq)]
pub enum CoreError {
    /// An argument is out of its domain: (argument, explanation).
    InvalidArgument(&'static str, String),
    /// Client updates do not fit together: (client index, 0-based, explanation).
    Client(usize, String),
    /// A buffer could not be had: what it was for, bytes needed and available.
    Memory(String),
    /// Training produced a non-finite loss or non-finite parameters.
    Diverged(String),
    /// `Diverged` in one client's local work: (client index, 0-based, explanation).
    ClientDiverged(usize, String),
}

impl CoreError {
    /// The class of the error as the R side names it (`fedagg_error_<kind>`).
    pub fn kind(&self) -> &'static str {
        match self {
            CoreError::InvalidArgument(..) => "input",
            CoreError::Client(..) => "client",
            CoreError::Memory(_) => "memory",
            CoreError::Diverged(_) | CoreError::ClientDiverged(..) => "diverged",
        }
    }

    /// The 0-based client the error is about, if it is about one client.
    pub fn client(&self) -> Option<usize> {
        match self {
            CoreError::Client(k, _) | CoreError::ClientDiverged(k, _) => Some(*k),
            _ => None,
        }
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::InvalidArgument(arg, msg) => write!(f, "`{arg}`: {msg}"),
            CoreError::Client(k, msg) | CoreError::ClientDiverged(k, msg) => write!(f, "client {}: {msg}", k + 1),
            CoreError::Memory(msg) | CoreError::Diverged(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for CoreError {}

pub type CoreResult<T> = Result<T, CoreError>;

pub(crate) fn invalid<T>(arg: &'static str, msg: impl Into<String>) -> CoreResult<T> {
    Err(CoreError::InvalidArgument(arg, msg.into()))
}
