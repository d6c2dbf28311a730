//! One error type for the whole crate, and the exit code each kind of error maps to.
//!
//! Messages are written to read well after "error: " and to name the file, the key or the value
//! that is wrong, plus what to do about it where that is not obvious.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Documented process exit codes (see docs/checks-and-verdicts.md, "Reports and exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// Everything ran and every check passed.
    Success = 0,
    /// Everything ran, and at least one check failed.
    CheckFailed = 1,
    /// The user's input is wrong: a bad suite, flag, LoRA file or prompt.
    Usage = 2,
    /// The environment is wrong: a missing or broken model, out of memory, an I/O failure.
    Infrastructure = 3,
    /// A bug in loragate (the same code a Rust panic exits with): please report it.
    Internal = 101,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A file that should hold tensors (safetensors) is corrupt, truncated or not safetensors.
    #[error("{}: not a readable safetensors file: {reason}", path.display())]
    TensorFile { path: PathBuf, reason: String },

    /// A LoRA file that cannot be applied as asked (bad keys, shapes, values, format).
    #[error("{}: {message}", path.display())]
    Lora { path: PathBuf, message: String },

    /// A well-formed LoRA that does not fit the model it is applied to (wrong base family,
    /// modules the model does not have). Suites report this per case instead of failing.
    #[error("{}: {message}", path.display())]
    LoraMismatch { path: PathBuf, message: String },

    /// A model folder or checkpoint that is missing parts or does not fit its config.
    #[error("model {}: {message}", path.display())]
    Model { path: PathBuf, message: String },

    /// A suite file that does not parse or validate, pointing at the place to fix.
    /// `infrastructure` marks problems of the environment (a model folder that is missing),
    /// which exit with 3 rather than 2.
    #[error("{}:{line}:{column}: {message}{}", file.display(), hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    Suite { file: PathBuf, line: usize, column: usize, message: String, hint: Option<String>, infrastructure: bool },

    /// A value the user gave (flag, prompt, size, suite value) is not acceptable.
    #[error("{0}")]
    Invalid(String),

    /// A tensor operation failed: a bug or an environment problem (out of memory, device).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),

    /// Something that cannot happen did: a bug in loragate, not in the user's input.
    #[error("internal error (a bug in loragate; please report it): {0}")]
    Internal(String),
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn lora(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Lora { path: path.as_ref().to_path_buf(), message: message.into() }
    }
    pub fn model(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Model { path: path.as_ref().to_path_buf(), message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }

    /// Which documented exit code this error ends the process with.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Suite { infrastructure: true, .. } => ExitCode::Infrastructure,
            Error::Lora { .. } | Error::LoraMismatch { .. } | Error::Suite { .. } | Error::Invalid(_) => ExitCode::Usage,
            // A LoRA or dataset the user named is "input"; a model folder is infrastructure.
            Error::TensorFile { .. } | Error::Io { .. } | Error::Model { .. } | Error::Tensor(_) => {
                ExitCode::Infrastructure
            }
            Error::Internal(_) => ExitCode::Internal,
        }
    }
}

/// Attach a path to an `std::io::Error`.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

/// Where a YAML (serde-saphyr) error points, 1-based, and its message without the
/// "line L column C:" prefix that the location already gives.
pub fn yaml_error_parts(e: &serde_saphyr::Error) -> (usize, usize, String) {
    let (line, column) = e.location().map(|l| (l.line() as usize, l.column() as usize)).unwrap_or((1, 1));
    let full = e.to_string();
    let first = full.lines().next().unwrap_or("invalid YAML").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let message = match first.split_once(": ") {
        Some((head, rest)) if head.starts_with("line ") => rest.to_string(),
        _ => first.to_string(),
    };
    (line, column, message)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bugs_have_their_own_exit_code_and_user_errors_keep_2() {
        assert_eq!(Error::internal("job 3 was neither cached nor generated").exit_code() as i32, 101);
        assert!(Error::internal("x").to_string().contains("a bug in loragate"));
        assert_eq!(Error::invalid("bad flag").exit_code() as i32, 2);
        assert_eq!(Error::model("m", "missing").exit_code() as i32, 3);
    }
}
