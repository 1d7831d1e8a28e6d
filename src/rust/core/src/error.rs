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

#[cfg(test)]
mod tests {
    use super::num;

    #[test]
    fn numbers_in_messages_are_short() {
        assert_eq!(num(1e300), "1.000e300");
        assert_eq!(num(0.123456789123), "0.1235");
        assert_eq!(num(0.01), "0.01");
        assert_eq!(num(2.0), "2");
        assert_eq!(num(1234.5678), "1235");
        assert_eq!(num(f64::INFINITY), "inf");
        assert_eq!(num(12.345678), "12.35");
        assert_eq!(num(4.1), "4.1");
        assert_eq!(num(1.5e-7), "1.500e-7");
        assert_eq!(num(0.0), "0");
    }
}

pub type CoreResult<T> = Result<T, CoreError>;

/// A number for a message: four significant digits, without trailing zeros,
/// in scientific notation outside 1e-4..1e7 (Rust's `{}` would print 1e300
/// with three hundred digits).
pub fn num(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let magnitude = x.abs().log10().floor() as i32;
    if !(-4..=6).contains(&magnitude) {
        return format!("{x:.3e}");
    }
    let decimals = (3 - magnitude).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

pub(crate) fn invalid<T>(arg: &'static str, msg: impl Into<String>) -> CoreResult<T> {
    Err(CoreError::InvalidArgument(arg, msg.into()))
}
