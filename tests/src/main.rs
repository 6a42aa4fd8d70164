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
        /// `GET /health` answers 500 while this file exists.
        #[arg(long)]
        fail_file: Option<PathBuf>,
        /// Also echo UDP on this port.
        #[arg(long)]
        udp_port: Option<u16>,
        /// Also answer agent checks on this port with --agent-file's line.
        #[arg(long, requires = "agent_file")]
        agent_port: Option<u16>,
        /// The agent's answer (default 100%).
        #[arg(long)]
        agent_file: Option<PathBuf>,
    },
    /// COUNT ICMP echo requests to TARGET (raw socket); prints how many
    /// got a correct reply.
    Ping {
        #[arg(long)]
        target: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 3)]
        count: u16,
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
    /// New HTTP connections to TARGET at RATE per second for DURATION;
    /// prints a JSON list of attempts (start time, backend or error).
    Stream {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 50)]
        rate: u32,
        #[arg(long, default_value_t = 5000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// A UDP probe to TARGET at RATE per second for DURATION (one flow);
    /// prints a JSON report with the longest gap.
    Probe {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value_t = 5000)]
        duration_ms: u64,
    },
    /// COUNT datagrams with payload HEX (e.g. a QUIC packet) to TARGET from
    /// one socket bound to BIND (port 0: a new port); prints the name of
    /// the backend that answered each one ("-" for no answer in 1 s).
    Datagrams {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        hex: String,
        #[arg(long, default_value_t = 1)]
        count: u16,
    },
    /// The benchmark (what `cargo xtask bench` runs).
    Bench {
        /// The xlb binary.
        #[arg(long)]
        xlb: PathBuf,
        /// The XDP object built with the `floors` feature.
        #[arg(long)]
        floors: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Only these sections (cost, live, compare), comma-separated.
        #[arg(long, value_delimiter = ',')]
        sections: Vec<String>,
    },
    /// Live-frame generator (runs in the generator namespace); prints JSON.
    Gen {
        #[arg(long)]
        floors: String,
        #[arg(long)]
        iface: String,
        #[arg(long)]
        dst_mac: String,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Live-frame runs (the program transmits --keep of every 1024).
        #[arg(long, default_value_t = 1 << 22)]
        runs: u64,
        /// Frames transmitted per 1024 runs, 1..=1024 (sets the offered rate).
        #[arg(long, default_value_t = 1024)]
        keep: u32,
        /// Distinct flows cycled through; 0: every frame a new flow.
        #[arg(long, default_value_t = 1024)]
        flows: u32,
        /// Upper bound on sending time, seconds.
        #[arg(long, default_value_t = 5.0)]
        max_secs: f64,
        /// Source addresses 10.N.x.x: each call its own block, so that
        /// with --flows 0 no call repeats another's flows.
        #[arg(long, default_value_t = 201)]
        source_block: u8,
    },
    /// Hold a floors-object program on an interface until SIGTERM/SIGINT.
    Attach {
        #[arg(long)]
        floors: String,
        #[arg(long)]
        prog: String,
        #[arg(long)]
        iface: String,
        /// `floor_forward`: the VIP it forwards.
        #[arg(long)]
        vip: Option<std::net::Ipv4Addr>,
        /// `floor_forward`: backend MACs, spread over its ring in turn.
        #[arg(long = "ring-mac")]
        ring_macs: Vec<String>,
    },
    /// One HTTP request; prints the response.
    Get {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
    },
    /// The demo (what `cargo xtask demo` runs).
    Demo {
        /// The xlb binary.
        #[arg(long)]
        xlb: PathBuf,
    },
}

fn main() {
    let r: Result<()> = match Cli::parse().cmd {
        Cmd::Serve { name, port, fail_file, udp_port, agent_port, agent_file } => {
            xlb_tests::traffic::serve(&name, port, fail_file, udp_port, agent_port.zip(agent_file))
        }
        Cmd::Datagrams { target, bind, hex, count } => xlb_tests::traffic::datagrams(target, bind, &hex, count.min(100)).map(|who| {
            for w in who {
                println!("{w}");
            }
        }),
        Cmd::Ping { target, count } => xlb_tests::traffic::ping(target, count.min(100), Duration::from_secs(1)).map(|n| println!("{n}")),
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
        Cmd::Stream { target, rate, duration_ms, timeout_ms } => {
            let a = xlb_tests::traffic::stream(
                target,
                rate.clamp(1, 1000),
                Duration::from_millis(duration_ms.min(60_000)),
                Duration::from_millis(timeout_ms.clamp(100, 10_000)),
            );
            println!("{}", serde_json::to_string(&a).unwrap_or_default());
            Ok(())
        }
        Cmd::Probe { target, rate, duration_ms } => {
            xlb_tests::traffic::probe(target, rate.clamp(1, 1000), Duration::from_millis(duration_ms.min(60_000)))
                .map(|r| println!("{}", serde_json::to_string(&r).unwrap_or_default()))
        }
        Cmd::Bench { xlb, floors, out, sections } => xlb_tests::bench::run(&xlb, &floors, &out, &sections),
        Cmd::Gen { floors, iface, dst_mac, size, runs, keep, flows, max_secs, source_block } => (|| {
            let mac: xlb::config::Mac = dst_mac.parse()?;
            let r = xlb_tests::bench::live::generate(&floors, &iface, mac.0, size.clamp(54, 1500), runs.min(1 << 30), keep.clamp(1, 1024), flows, source_block, max_secs.clamp(0.1, 60.0))?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        })(),
        Cmd::Attach { floors, prog, iface, vip, ring_macs } => (|| {
            let macs = ring_macs.iter().map(|m| m.parse::<xlb::config::Mac>().map(|m| m.0)).collect::<Result<Vec<_>, _>>()?;
            xlb_tests::bench::live::attach(&floors, &prog, &iface, vip, &macs)
        })(),
        Cmd::Get { target, path, method } => xlb_tests::traffic::request(target, &method, &path).map(|r| print!("{r}")),
        Cmd::Demo { xlb } => xlb_tests::demo::run(&xlb),
    };
    if let Err(e) = r {
        eprintln!("xlb-lab: error: {e:#}");
        std::process::exit(1);
    }
}
