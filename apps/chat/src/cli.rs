//! `keel chat`: one chat instance from the command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::{Chat, ChatConfig};

/// `keel chat` arguments. Settings not given here come from `--config` (a TOML file of
/// [`ChatConfig`] fields), then from the defaults.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A TOML file of settings (the fields of docs/chat.md's configuration table).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory of the rooms' journal.
    #[arg(long)]
    pub data_dir: Option<String>,
    /// This instance's name.
    #[arg(long)]
    pub instance: Option<String>,
    /// The rooms' journal in a JetStream stream (`nats://HOST:PORT[?replicas=N]`).
    #[arg(long)]
    pub journal: Option<String>,
    /// A file holding the token-signing key (else KEEL_CHAT_SECRET, else a random key).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Every instance of the chat, this one included (`NAME` or `NAME=HOST:PORT`, comma
    /// separated).
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// The naming service to register in and find the peers through.
    #[arg(long)]
    pub registry: Option<String>,
    /// A NATS server to reach the peers through.
    #[arg(long)]
    pub nats: Option<String>,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Builds the settings `args` describe.
pub fn config(args: &ChatArgs) -> anyhow::Result<ChatConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => ChatConfig::default(),
    };
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(instance) = &args.instance {
        config.instance = instance.clone();
    }
    if let Some(journal) = &args.journal {
        config.journal = journal.clone();
    }
    if !args.peers.is_empty() {
        config.peers = args.peers.clone();
    }
    if let Some(registry) = &args.registry {
        config.registry = registry.clone();
    }
    if let Some(nats) = &args.nats {
        config.nats = nats.clone();
    }
    match &args.secret_file {
        Some(path) => {
            let secret = std::fs::read_to_string(path)
                .with_context(|| format!("reading the secret in {}", path.display()))?;
            anyhow::ensure!(!secret.trim().is_empty(), "{} is empty", path.display());
            config.secret = secret.trim().to_owned();
        }
        None => {
            if let Ok(secret) = std::env::var("KEEL_CHAT_SECRET") {
                config.secret = secret;
            }
        }
    }
    config.check()?;
    Ok(config)
}

/// Runs one instance until Ctrl-C or SIGTERM.
pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let config = config(&args)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        builder.worker_threads(args.threads);
    }
    let rt = builder.enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let instance = config.instance.clone();
        let dir = match config.journal.as_str() {
            "" => config.data_dir.clone(),
            _ => format!("nats stream keel-chat-{instance}"),
        };
        let chat = Chat::open(config)
            .await
            .with_context(|| format!("opening the chat journal in {dir}"))?;
        // On stdout, so scripts and tests can wait for it.
        keel_net::say!(
            "keel chat {instance} on {} (data in {dir}); Ctrl-C stops",
            listener.local_addr()?
        );
        chat.serve(listener, keel_net::stop_requested()).await?;
        Ok(())
    })
}
