//! `keel-seckill`: the flash-sale application's processes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keel_seckill::{Inventory, InventoryService, proto};

#[derive(Parser, Debug)]
#[command(
    name = "keel-seckill",
    version,
    about = "Keel's flash-sale application"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an inventory instance until Ctrl-C.
    Inventory {
        /// Address to listen on (Keel RPC and HTTP/JSON).
        #[arg(long, default_value = "127.0.0.1:7200")]
        addr: SocketAddr,
        /// Directory of the instance's journal.
        #[arg(long, default_value = "keel-data/inventory")]
        data_dir: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inventory { addr, data_dir } => {
            let inventory = Inventory::open(&data_dir, keel_store::JournalOptions::default())
                .with_context(|| format!("opening the inventory in {}", data_dir.display()))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                println!("inventory on {}", listener.local_addr()?);
                let server = keel_rpc::Server::builder()
                    .add_service(proto::InventoryServer::new(InventoryService::new(
                        Arc::new(inventory),
                    )))
                    .build();
                server
                    .serve(listener, async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await?;
                Ok(())
            })
        }
    }
}
