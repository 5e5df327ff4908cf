//! The `walpush` binary: parses arguments and hands over to the library.

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = walpush::cli::Cli::parse();
    // The demo prints a report; its logs would only get in the way.
    let quiet = std::env::args().nth(1).is_some_and(|a| a == "demo");
    init_logs(if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("walpush: cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(walpush::cli::run(cli));
    // Tasks still blocked on the network must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Err(err) = result {
        eprintln!("walpush: {err}");
        std::process::exit(err.exit_code());
    }
}

/// Logs go to standard error; `RUST_LOG` filters, `WALPUSH_LOG_FORMAT=json` switches format.
fn init_logs(default: &str) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("WALPUSH_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
