//! Library side of the `keel` binary: the load generator behind `keel bench` and `keel demo`
//! (shared with the benchmark peers in `bench/peers`, so every contender is measured by the
//! same code). The binary itself only dispatches its subcommands: the platform's servers
//! (`serve`, `registry`, `gateway`), the benchmarks, and the flash sale's commands (`up`,
//! `node`, `seckill <role>`), which live with the sale in `keel-seckill`.

pub mod loadgen;
