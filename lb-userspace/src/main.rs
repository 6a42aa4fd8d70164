//! The `xlb` binary: agent and CLI in one.
use clap::Parser;

fn main() {
    let cli = xlb::cli::Cli::parse();
    let default = if matches!(cli.command, xlb::cli::Command::Agent(_)) { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(format!("{default},netlink_packet_route=error"))).init();
    if let Err(e) = xlb::cli::run(cli) {
        // One line: the whole context chain, outermost first.
        let msg = format!("{e:#}");
        if msg.contains("Verifier output") {
            // The verifier log is multi-line and is the useful part.
            eprintln!("xlb: error: {msg}");
        } else {
            eprintln!("xlb: error: {}", msg.replace('\n', " "));
        }
        std::process::exit(1);
    }
}
