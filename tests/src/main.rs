//! `xlb-lab`: helpers that run inside lab namespaces (test HTTP server,
//! client load) and the demo.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[derive(Parser)]
#[command(name = "xlb-lab", about = "xlb's test lab helpers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP server answering with NAME.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
    /// COUNT HTTP connections to TARGET; prints a JSON summary.
    Connect {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Hold COUNT long-lived connections to TARGET for DURATION; prints JSON.
    Hold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 50)]
        count: usize,
        #[arg(long, default_value_t = 5000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// Shared vs per-CPU connection table cost (`cargo xtask measure-conntrack`).
    MeasureConntrack { shared: String, percpu: String },
    /// The demo (what `cargo xtask demo` runs).
    Demo {
        /// The xlb binary.
        #[arg(long)]
        xlb: PathBuf,
    },
}

fn main() {
    let r: Result<()> = match Cli::parse().cmd {
        Cmd::Serve { name, port } => xlb_tests::traffic::serve(&name, port),
        Cmd::Connect { target, count, parallel, timeout_ms } => {
            let s = xlb_tests::traffic::connect(target, count.min(100_000), parallel.min(64), Duration::from_millis(timeout_ms));
            println!("{}", serde_json::to_string(&s).unwrap_or_default());
            Ok(())
        }
        Cmd::Hold { target, count, duration_ms, interval_ms } => {
            let held = xlb_tests::traffic::hold(
                target,
                count.min(1000),
                Duration::from_millis(duration_ms.min(120_000)),
                Duration::from_millis(interval_ms.max(10)),
            );
            println!("{}", serde_json::to_string(&held).unwrap_or_default());
            Ok(())
        }
        Cmd::MeasureConntrack { shared, percpu } => xlb_tests::measure::run(&shared, &percpu),
        Cmd::Demo { xlb } => xlb_tests::demo::run(&xlb),
    };
    if let Err(e) = r {
        eprintln!("xlb-lab: error: {e:#}");
        std::process::exit(1);
    }
}
