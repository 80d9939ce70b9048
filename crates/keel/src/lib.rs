//! Library side of the `keel` binary: the load generator behind `keel bench` and `keel demo`
//! (shared with the benchmark peers in `bench/peers`, so every contender is measured by the
//! same code), `keel up`, which runs the flash-sale system as separate processes on one
//! machine, and `keel node`, which runs one host's share of it across several machines.

/// `println!` that never panics: a closed stdout (`keel up | head -3`) drops the line instead
/// of killing the process.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

pub mod loadgen;
pub mod node;
pub mod up;
