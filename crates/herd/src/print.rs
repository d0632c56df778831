//! What the client commands print. `println!` panics when stdout is closed (`herd ls | head
//! -0`), and the release profile aborts on a panic; here a write to stdout returns an error
//! instead, and `main` ends a command whose reader went away with exit 0, quietly, as
//! `cat` or ripgrep do. Messages on stderr are best effort: a closed stderr loses them.

use std::io::{self, Write};

/// A write to stdout that failed. [`StdoutError::is_closed`] when nobody reads any more.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to stdout: {0}")]
pub struct StdoutError(#[source] io::Error);

impl StdoutError {
    /// The reader is gone (EPIPE): a normal way to stop, not a failure.
    pub fn is_closed(&self) -> bool {
        self.0.kind() == io::ErrorKind::BrokenPipe
    }
}

/// Writes to stdout and flushes; see [`outln!`].
pub fn stdout(args: std::fmt::Arguments<'_>) -> Result<(), StdoutError> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(StdoutError)
}

/// Writes to stderr, ignoring failure (there is nowhere left to report it); see [`errln!`].
pub fn stderr(args: std::fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// `println!` that returns `Result<(), StdoutError>` instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::print::stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` that never panics.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::print::stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {errln, outln};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broken_pipe_counts_as_closed() {
        assert!(StdoutError(io::ErrorKind::BrokenPipe.into()).is_closed());
        assert!(!StdoutError(io::Error::from_raw_os_error(libc::ENOSPC)).is_closed());
    }
}
