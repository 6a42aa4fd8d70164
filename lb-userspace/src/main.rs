//! The `xlb` binary: agent and CLI in one.
use clap::{error::ErrorKind, Parser};

/// On musl (the build whose process start is short: see xtask's `build`),
/// dlmalloc instead of musl's allocator, which made the agent's table
/// builds and answers ~1.5× slower.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// Print an error as one line on stderr and exit non-zero.
fn fail(msg: &str, code: i32) -> ! {
    eprintln!("xlb: error: {msg}");
    std::process::exit(code);
}

fn main() {
    let cli = match xlb::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) => {
            e.exit()
        }
        Err(e) => {
            // clap explains over several lines; keep the facts, on one line.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .collect();
            fail(parts.join(" ").trim_start_matches("error: "), 2)
        }
    };
    let default = if matches!(cli.command, xlb::cli::Command::Agent(_)) { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(format!("{default},netlink_packet_route=error")))
        .init();
    if let Err(e) = xlb::cli::run(cli) {
        let msg = format!("{e:#}");
        if msg.contains("verifier rejected") {
            // The verifier's log is the useful part of this error: keep its lines.
            fail(&msg, 1)
        }
        fail(&msg.replace('\n', " "), 1)
    }
}
