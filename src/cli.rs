//! The command line: argument parsing, configuration precedence and exit codes.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{self, Config, ConfigError};
use crate::engine::{error_chain, Engine};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::{admin, channels, ledger, schema, source};

/// walpush: push committed outbox rows to devices, with an exactly-once ledger.
#[derive(Debug, Parser)]
#[command(name = "walpush", version, about)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// The TOML configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// PostgreSQL URL; overrides WALPUSH_DATABASE_URL, DATABASE_URL and the config file.
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the schema, the publication and the slot; safe to run again.
    Migrate,
    /// Run the engine until SIGINT or SIGTERM.
    Run,
    /// Slot, confirmed LSN, lag and deliveries by status and channel.
    Status {
        /// One JSON object on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Push again the outbox rows whose commit LSN is in a range.
    Replay(ReplayArgs),
    /// Inspect and requeue dead deliveries.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Start a throwaway PostgreSQL, push sample rows to a built-in receiver, report, clean up.
    Demo,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// Inclusive lower bound, as PostgreSQL prints LSNs (0/16B3748).
    #[arg(long, value_name = "LSN")]
    from_lsn: String,
    /// Inclusive upper bound; the end of the ledger when omitted.
    #[arg(long, value_name = "LSN")]
    to_lsn: Option<String>,
    /// Also send deliveries already sent.
    #[arg(long)]
    redeliver: bool,
    /// Only say what would be sent.
    #[arg(long)]
    dry_run: bool,
    /// One JSON object on standard output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum DeadCommand {
    /// List dead deliveries.
    List {
        /// Only this outbox row's.
        #[arg(long)]
        outbox_id: Option<i64>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// One JSON object on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Requeue dead deliveries for the retry scheduler of a running walpush.
    Retry {
        /// Only this outbox row's.
        #[arg(long)]
        outbox_id: Option<i64>,
    },
}

/// A command's failure, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage or configuration: exit 2.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// Anything else: exit 1.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// 2 for usage or configuration, 1 for anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) => 2,
            CliError::Failed(_) => 1,
        }
    }

    fn from_err(err: &dyn std::error::Error) -> CliError {
        CliError::Failed(error_chain(err))
    }
}

impl From<tokio_postgres::Error> for CliError {
    fn from(err: tokio_postgres::Error) -> CliError {
        CliError::from_err(&err)
    }
}

impl From<source::SourceError> for CliError {
    fn from(err: source::SourceError) -> CliError {
        CliError::from_err(&err)
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Demo = cli.command {
        return crate::demo::run()
            .await
            .map_err(|e| CliError::Failed(format!("demo: {e:#}")));
    }
    let config = match &cli.global.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let url = database_url(&cli.global, &config)?;
    match cli.command {
        Command::Migrate => migrate(&url, &config).await,
        Command::Run => run_engine(url, config).await,
        Command::Status { json } => status(&url, &config, json).await,
        Command::Replay(args) => replay(&url, &config, args).await,
        Command::Dead { command } => dead(&url, command).await,
        Command::Demo => unreachable!("handled above"),
    }
}

/// `--database-url`, then `WALPUSH_DATABASE_URL`, then `DATABASE_URL`, then the file.
fn database_url(global: &Global, config: &Config) -> Result<String, ConfigError> {
    let candidates = [
        ("--database-url", global.database_url.clone()),
        (
            "WALPUSH_DATABASE_URL",
            std::env::var("WALPUSH_DATABASE_URL").ok(),
        ),
        ("DATABASE_URL", std::env::var("DATABASE_URL").ok()),
        ("database_url", config.database_url.clone()),
    ];
    for (key, value) in candidates {
        if let Some(url) = value.filter(|v| !v.trim().is_empty()) {
            config::check_database_url(key, &url)?;
            return Ok(url);
        }
    }
    Err(ConfigError::new(
        "database_url",
        "no database URL: pass --database-url, set WALPUSH_DATABASE_URL or DATABASE_URL, \
         or set database_url in the config file",
    ))
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, CliError> {
    ledger::connect(url).await.map_err(|err| {
        CliError::Failed(format!(
            "cannot connect to PostgreSQL: {}",
            error_chain(&err)
        ))
    })
}

async fn migrate(url: &str, config: &Config) -> Result<(), CliError> {
    let mut client = connect(url).await?;
    let applied = schema::migrate(&mut client).await?;
    let version = schema::MIGRATIONS.last().map_or(0, |m| m.0);
    if applied.is_empty() {
        println!("schema walpush is up to date (version {version})");
    } else {
        println!("schema walpush migrated to version {version} (applied {applied:?})");
    }
    // The slot is created now, so every row committed from here on is pushed, also when
    // walpush has not started yet.
    match source::check_wal_level(&client).await {
        Ok(()) => {
            source::ensure_publication(&client, &config.publication).await?;
            let created = source::ensure_slot(&client, &config.slot).await?;
            let verb = if created { "created" } else { "exists" };
            println!(
                "publication {} and slot {} ready (slot {verb})",
                config.publication, config.slot
            );
        }
        Err(err @ source::SourceError::WalLevel(_)) => {
            eprintln!("warning: the slot was not created: {err}");
        }
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

async fn run_engine(url: String, config: Config) -> Result<(), CliError> {
    let registry = channels::Registry::from_config(&config.channels)
        .map_err(|err| ConfigError::new("channels", err.to_string()))?;
    if registry.is_empty() {
        tracing::warn!("no channels configured: every delivery will be dead");
    }
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(forward_signals(stop_tx));

    let http = match tokio::net::TcpListener::bind(config.http.listen).await {
        Ok(listener) => {
            let addr = listener.local_addr().ok();
            tracing::info!(listen = ?addr, "http endpoint listening");
            Some(tokio::spawn(crate::http::serve(
                listener,
                metrics.clone(),
                stop_rx.clone(),
            )))
        }
        Err(err) if config.http.explicit => {
            return Err(CliError::Failed(format!(
                "cannot listen on http.listen {}: {err}",
                config.http.listen
            )));
        }
        Err(err) => {
            tracing::warn!(listen = %config.http.listen, error = %err, "http endpoint disabled");
            None
        }
    };

    let engine = Engine::new(config, url, registry, metrics);
    let result = engine.run(stop_rx).await;
    if let Some(http) = http {
        http.abort();
    }
    result.map_err(|err| CliError::Failed(error_chain(&err)))
}

/// Turns SIGINT and SIGTERM into the shutdown signal.
pub async fn forward_signals(stop: watch::Sender<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down: finishing the batch in hand");
    let _ = stop.send(true);
}

async fn status(url: &str, config: &Config, json: bool) -> Result<(), CliError> {
    let client = connect(url).await?;
    let status = admin::status(&client, &config.slot).await?;
    if json {
        println!("{}", serde_json::to_string(&status).unwrap_or_default());
        return Ok(());
    }
    let none = || "-".to_owned();
    println!(
        "slot:          {}{}",
        status.slot,
        if status.slot_exists { "" } else { " (missing)" }
    );
    println!("active:        {}", status.active);
    println!(
        "confirmed_lsn: {}",
        status.confirmed_lsn.clone().unwrap_or_else(none)
    );
    println!(
        "ledger_lsn:    {}",
        status.ledger_lsn.clone().unwrap_or_else(none)
    );
    println!(
        "lag_bytes:     {}",
        status.lag_bytes.map_or_else(none, |l| l.to_string())
    );
    println!("deliveries:");
    for (name, count) in &status.deliveries {
        println!("  {name:<10} {count}");
    }
    for (channel, counts) in &status.channels {
        let line: Vec<String> = counts
            .iter()
            .filter(|(_, c)| **c > 0)
            .map(|(s, c)| format!("{s}={c}"))
            .collect();
        println!("channel {channel}: {}", line.join(" "));
    }
    Ok(())
}

fn parse_lsn(key: &str, value: &str) -> Result<Lsn, CliError> {
    value
        .parse()
        .map_err(|err: crate::lsn::ParseLsnError| ConfigError::new(key, err.to_string()).into())
}

async fn replay(url: &str, config: &Config, args: ReplayArgs) -> Result<(), CliError> {
    let from = parse_lsn("--from-lsn", &args.from_lsn)?;
    let to = match &args.to_lsn {
        Some(to) => parse_lsn("--to-lsn", to)?,
        None => Lsn(u64::MAX),
    };
    if to < from {
        return Err(ConfigError::new("--to-lsn", "must not be below --from-lsn").into());
    }
    let client = connect(url).await?;
    if args.dry_run {
        let preview = admin::replay_preview(&client, from, to, args.redeliver).await?;
        let total: i64 = preview.values().flat_map(|m| m.values()).sum();
        if args.json {
            let out = serde_json::json!({
                "dry_run": true, "from_lsn": from.to_string(), "to_lsn": to.to_string(),
                "redeliver": args.redeliver, "deliveries": total, "channels": preview,
            });
            println!("{out}");
        } else {
            println!("dry run: would send {total} deliveries ({from} to {to})");
            for (channel, counts) in preview {
                for (status, count) in counts {
                    println!("  {channel:<12} {status:<10} {count}");
                }
            }
        }
        return Ok(());
    }

    let registry = channels::Registry::from_config(&config.channels)
        .map_err(|err| ConfigError::new("channels", err.to_string()))?;
    let policy = crate::retry::Policy::new(&config.retry);
    let metrics = Metrics::new();
    let mut ledger = ledger::Ledger::new(client, &config.slot).await?;
    let mut after = (i64::MIN, i64::MIN);
    let mut counts: std::collections::BTreeMap<&'static str, i64> = Default::default();
    loop {
        let selection = ledger::Selection::Replay {
            from,
            to,
            redeliver: args.redeliver,
            after,
        };
        let mut statuses = Vec::new();
        let due = ledger
            .resend(selection, 500, async |due: &[ledger::Due]| {
                let (records, gone) =
                    crate::engine::resend(&registry, &policy, &metrics, due).await;
                statuses = records.iter().map(|r| r.status.as_str()).collect();
                (records, gone)
            })
            .await?;
        for status in statuses {
            *counts.entry(status).or_default() += 1;
        }
        match due.last() {
            Some(last) if due.len() == 500 => after = (last.outbox_id, last.device_id),
            _ => break,
        }
    }
    let total: i64 = counts.values().sum();
    if args.json {
        let out = serde_json::json!({
            "dry_run": false, "from_lsn": from.to_string(), "to_lsn": to.to_string(),
            "redeliver": args.redeliver, "deliveries": total, "statuses": counts,
        });
        println!("{out}");
    } else {
        let parts: Vec<String> = counts.iter().map(|(s, c)| format!("{s}={c}")).collect();
        println!(
            "replayed {total} deliveries ({from} to {to}): {}",
            parts.join(" ")
        );
    }
    Ok(())
}

async fn dead(url: &str, command: DeadCommand) -> Result<(), CliError> {
    let client = connect(url).await?;
    match command {
        DeadCommand::List {
            outbox_id,
            limit,
            json,
        } => {
            let rows = admin::dead_list(&client, outbox_id, limit.max(0)).await?;
            if json {
                let out = serde_json::json!({ "dead": rows });
                println!("{out}");
            } else {
                println!("outbox_id\tdevice_id\tchannel\tattempts\tcommit_lsn\tlast_error");
                for r in rows {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        r.outbox_id,
                        r.device_id,
                        r.channel,
                        r.attempts,
                        r.commit_lsn,
                        r.last_error.unwrap_or_default()
                    );
                }
            }
        }
        DeadCommand::Retry { outbox_id } => {
            let count = admin::dead_retry(&client, outbox_id).await?;
            println!("requeued {count} dead deliveries; a running walpush retries them now");
        }
    }
    Ok(())
}
