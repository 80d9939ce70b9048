//! `keel-seckill`: the flash-sale application's processes (see `keel_seckill::cli`).

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "keel-seckill",
    version,
    about = "Keel's flash-sale application"
)]
struct Cli {
    #[command(subcommand)]
    role: keel_seckill::cli::Role,
}

fn main() -> anyhow::Result<()> {
    keel_seckill::cli::run(Cli::parse().role)
}
