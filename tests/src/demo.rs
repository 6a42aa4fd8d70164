//! `cargo xtask demo`: a VIP with three backends in a throwaway namespace
//! topology; real TCP connections spread over them; one backend dies and is
//! removed while every new connection still succeeds. Everything is torn
//! down at the end, on error, and on Ctrl-C.

use anyhow::{bail, Result};
use std::{path::Path, time::Duration};

use crate::{
    lab::{self, backend_ip},
    scenario::{vip_arg, Deployment},
    traffic::Summary,
};

const CONNECTIONS: usize = 300;

fn show(label: &str, s: &Summary) {
    println!("\n{label}: {} ok, {} failed", s.ok, s.failed);
    for (name, n) in &s.by_backend {
        let pct = 100.0 * *n as f64 / s.ok.max(1) as f64;
        println!("  {name:<4} {n:>4}  {:<40} {pct:5.1}%", "#".repeat((pct / 2.5) as usize));
    }
    for (e, n) in &s.errors {
        println!("  error ×{n}: {e}");
    }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

/// Run the demo.
pub fn run(xlb: &Path) -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing the lab down");
        lab::cleanup_all();
        std::process::exit(130);
    })?;
    let lab_bin = std::env::current_exe()?;
    step("creating namespaces: client, lb, b1..b3 on one bridge; VIP on the backends' loopback");
    let d = Deployment::start(xlb, &lab_bin, 3, &[])?;
    println!("    xlb agent attached to eth0 in {} (log: {})", d.lab.ns("lb"), d.lab.dir.join("agent.log").display());
    step("configuring through the CLI");
    let vip = vip_arg();
    let cmds: Vec<Vec<String>> = std::iter::once(vec!["vip".into(), "add".into(), vip.clone()])
        .chain((1..=3).map(|i| vec!["backend".into(), "add".into(), vip.clone(), backend_ip(i).to_string()]))
        .collect();
    for c in &cmds {
        println!("    $ xlb {}", c.join(" "));
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        d.cli_ok(&args)?;
    }
    let waited = d.wait_states(&[1, 2, 3], Duration::from_secs(10))?;
    println!("    all backends resolved and healthy after {waited:.2?}");
    step("xlb status");
    print!("{}", d.cli_ok(&["status"])?);

    step(&format!("{CONNECTIONS} TCP connections (HTTP GET) from the client to {vip}"));
    let before = d.connect(CONNECTIONS)?;
    show("spread", &before);

    step("killing b2's server: health checks must take b2 out");
    let mut d = d;
    d.lab.kill("server2")?;
    let detect = d.wait_states(&[1, 3], Duration::from_secs(10))?;
    println!("    b2 marked down and removed from the Maglev table {detect:.2?} after the kill");
    print!("{}", d.cli_ok(&["status"])?);

    step(&format!("{CONNECTIONS} more connections"));
    let after = d.connect(CONNECTIONS)?;
    show("spread", &after);
    let ok = before.failed == 0 && after.failed == 0 && !after.by_backend.contains_key("b2");
    step("tearing down");
    drop(d);
    if !ok {
        bail!("the demo saw failed connections or traffic to the dead backend");
    }
    println!("done: every connection succeeded, and none reached the dead backend.");
    Ok(())
}
