//! Library side of the `keel` binary: the load generator behind `keel bench` and `keel demo`
//! (shared with the benchmark peers in `bench/peers`, so every contender is measured by the
//! same code), and `keel up`, which runs the flash-sale system as separate processes.

pub mod loadgen;
pub mod up;
