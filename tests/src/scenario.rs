//! A running deployment: the lab topology with HTTP servers on every
//! backend, the pass-through XDP program on the balancer's bridge port, and
//! `xlb agent` on the balancer. Used by the end-to-end tests and the demo.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use crate::{
    lab::{self, Lab, VIP},
    traffic::Summary,
};

/// (IP, state) of a VIP's backends in `xlb status --json` output.
pub fn backend_states_in(status: &Value, vip: &str) -> Vec<(String, String)> {
    let v = status["vips"].as_array().into_iter().flatten().find(|v| v["vip"] == vip);
    v.and_then(|v| v["backends"].as_array())
        .into_iter()
        .flatten()
        .map(|b| (b["ip"].as_str().unwrap_or("").to_string(), b["state"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// The lab's service, as the CLI writes it.
pub fn vip_arg() -> String {
    format!("{VIP}:80/tcp")
}

/// The lab's IPv6 service.
pub fn vip6_arg() -> String {
    format!("[{}]:80/tcp", lab::VIP6)
}

/// Paths of the binaries under test, from the environment `cargo xtask test`
/// sets, or the release build next to the test executable.
pub fn binaries() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let xlb = std::env::var_os("XLB_BIN").map(PathBuf::from).unwrap_or_else(|| root.join("target/release/xlb"));
    let labb = std::env::var_os("XLB_LAB_BIN").map(PathBuf::from).unwrap_or_else(|| root.join("target/release/xlb-lab"));
    (xlb, labb)
}

/// Where a deployment's agents pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// In the lab's own bpffs (`--pin-root`): nothing touches the host's.
    Lab,
    /// Wherever the agent pins by default (no `--pin-root`), as a user
    /// runs it: the host's /sys/fs/bpf/xlb. Remove the pins at the end.
    Default,
}

/// A deployment under test.
pub struct Deployment {
    /// The topology (dropped last: tears everything down).
    pub lab: Lab,
    /// The `xlb` binary.
    pub xlb: PathBuf,
    /// The `xlb-lab` binary.
    pub lab_bin: PathBuf,
    /// The agent's API socket.
    pub socket: PathBuf,
    /// Where its agents pin.
    pub pinning: Pinning,
}

impl Deployment {
    /// Build the lab and start servers, the veth helper and the agent.
    pub fn start(xlb: &Path, lab_bin: &Path, backends: usize, agent_args: &[&str]) -> Result<Deployment> {
        Self::start_pinning(xlb, lab_bin, backends, agent_args, Pinning::Lab)
    }

    /// `start`, with the agents pinning as `pinning` says.
    pub fn start_pinning(xlb: &Path, lab_bin: &Path, backends: usize, agent_args: &[&str], pinning: Pinning) -> Result<Deployment> {
        let mut lab = Lab::new(backends)?;
        for i in 1..=backends {
            let fail = lab.dir.join(format!("fail-b{i}")).to_string_lossy().into_owned();
            let agent = lab.dir.join(format!("agent-b{i}")).to_string_lossy().into_owned();
            lab.spawn(
                &format!("server{i}"),
                &format!("b{i}"),
                lab_bin,
                &[
                    "serve", "--name", &format!("b{i}"), "--port", "80", "--fail-file", &fail, "--udp-port", "5353",
                    "--agent-port", "7777", "--agent-file", &agent,
                ],
            )?;
        }
        lab.spawn("xdp-pass", "sw", xlb, &["xdp-pass", "--iface", "p-lb"])?;
        let socket = lab.dir.join("xlb.sock");
        let mut d = Deployment { lab, xlb: xlb.to_path_buf(), lab_bin: lab_bin.to_path_buf(), socket, pinning };
        d.start_agent("agent", agent_args)?;
        let sw = d.lab.ns("sw");
        d.wait("the veth helper", Duration::from_secs(15), || {
            Ok(lab::sh("ip", &["-n", &sw, "link", "show", "p-lb"]).map(|s| s.contains("xdp")).unwrap_or(false))
        })?;
        Ok(d)
    }

    /// A lab with `backends` backends whose first `serving` serve the lab
    /// VIP (added through the CLI), all of them up.
    pub fn serving(backends: usize, serving: usize) -> Result<Deployment> {
        Self::serving_with(backends, serving, &[])
    }

    /// `serving`, with `xlb vip add` flags for the VIP.
    pub fn serving_with(backends: usize, serving: usize, vip_flags: &[&str]) -> Result<Deployment> {
        let (xlb, lab_bin) = binaries();
        let d = Deployment::start(&xlb, &lab_bin, backends, &[])?;
        let ips: Vec<String> = (1..=serving).map(|i| lab::backend_ip(i).to_string()).collect();
        d.configure_vip(&vip_arg(), vip_flags, &ips)?;
        let up: Vec<usize> = (1..=serving).collect();
        d.wait_states(&up, Duration::from_secs(10))?;
        Ok(d)
    }

    /// Where this deployment's agents pin (in the lab's own bpffs).
    pub fn pin_root(&self) -> PathBuf {
        self.lab.bpffs.join("xlb")
    }

    /// Where this deployment's agents keep their state file.
    pub fn state_dir(&self) -> PathBuf {
        self.lab.dir.join("state")
    }

    /// Start `xlb agent` on the balancer's eth0 as process `name` (pinning
    /// as `self.pinning` says unless `args` say `--no-pin`; the state file
    /// in the lab's directory) and wait for its API.
    pub fn start_agent(&mut self, name: &str, args: &[&str]) -> Result<()> {
        let (sock, pins, state) = (
            self.socket.to_string_lossy().into_owned(),
            self.pin_root().to_string_lossy().into_owned(),
            self.state_dir().to_string_lossy().into_owned(),
        );
        let mut all = vec!["--socket", sock.as_str(), "agent", "--iface", "eth0"];
        if !args.contains(&"--conntrack-size") {
            all.extend_from_slice(&["--conntrack-size", "65536"]);
        }
        if !args.contains(&"--no-pin") {
            all.extend_from_slice(&["--state-dir", &state]);
            if self.pinning == Pinning::Lab {
                all.extend_from_slice(&["--pin-root", &pins]);
            }
        }
        all.extend_from_slice(args);
        let xlb = self.xlb.clone();
        self.lab.spawn(name, "lb", &xlb, &all)?;
        self.wait("the agent's API", Duration::from_secs(15), || Ok(self.cli(&["vip", "list"])?.status.success()))
            .with_context(|| format!("agent {name}: {}", self.lab.log(name)))?;
        Ok(())
    }

    /// Poll `ready` every 50 ms until it holds or `limit` passes; returns the wait.
    pub fn wait(&self, what: &str, limit: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if ready()? {
                return Ok(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("timed out after {limit:?} waiting for {what}; agent log:\n{}", self.lab.log("agent"))
    }

    /// A CLI bound to another agent's socket (another balancer's).
    pub fn cli_at(xlb: &Path, socket: &Path) -> impl Fn(&[&str]) -> Output {
        let (xlb, socket) = (xlb.to_path_buf(), socket.to_path_buf());
        move |args: &[&str]| {
            std::process::Command::new(&xlb).arg("--socket").arg(&socket).args(args).output().expect("run xlb")
        }
    }

    /// Run the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        std::process::Command::new(&self.xlb)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("cannot run xlb")
    }

    /// Run the CLI and require success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!("`xlb {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `xlb status --json`.
    pub fn status(&self) -> Result<Value> {
        serde_json::from_str(&self.cli_ok(&["status", "--json"])?).context("status is not JSON")
    }

    /// States of the lab VIP's backends by IP.
    pub fn backend_states(&self) -> Result<Vec<(String, String)>> {
        self.backend_states_of(&vip_arg())
    }

    /// States of a VIP's backends by IP.
    pub fn backend_states_of(&self, vip: &str) -> Result<Vec<(String, String)>> {
        Ok(backend_states_in(&self.status()?, vip))
    }

    /// Add the lab VIP and all backends through the CLI (MACs resolved by the agent).
    pub fn configure(&self) -> Result<()> {
        let ips: Vec<String> = (1..=self.lab.backends).map(|i| lab::backend_ip(i).to_string()).collect();
        self.configure_vip(&vip_arg(), &[], &ips)
    }

    /// `xlb vip add VIP FLAGS…`, then `xlb backend add VIP IP` for each address.
    pub fn configure_vip(&self, vip: &str, flags: &[&str], backends: &[String]) -> Result<()> {
        let mut add = vec!["vip", "add", vip];
        add.extend_from_slice(flags);
        self.cli_ok(&add)?;
        for ip in backends {
            self.cli_ok(&["backend", "add", vip, ip])?;
        }
        Ok(())
    }

    /// Wait until exactly the backends in `up` (1-based) are up, the rest down.
    pub fn wait_states(&self, up: &[usize], limit: Duration) -> Result<Duration> {
        self.wait_states_of(&vip_arg(), &|i| lab::backend_ip(i).to_string(), up, limit)
    }

    /// Wait until, among a VIP's listed backends, exactly those with index
    /// in `up` (backend `i` has address `ip(i)`) are up and the rest down.
    pub fn wait_states_of(&self, vip: &str, ip: &dyn Fn(usize) -> String, up: &[usize], limit: Duration) -> Result<Duration> {
        let up_ips: Vec<String> = up.iter().map(|&i| ip(i)).collect();
        self.wait(&format!("exactly {up_ips:?} up in {vip}"), limit, || {
            let got = self.backend_states_of(vip)?;
            let all_listed = up_ips.iter().all(|u| got.iter().any(|(b, _)| b == u));
            Ok(all_listed && got.iter().all(|(b, st)| (st == "up") == up_ips.contains(b)))
        })
    }

    /// Start `xlb-lab hold` (`count` long-lived connections to the lab VIP
    /// for `ms`, a line every 100 ms) in the client namespace, as process `name`.
    pub fn spawn_hold(&mut self, name: &str, count: usize, ms: u64) -> Result<()> {
        let target = format!("{VIP}:80");
        let (c, ms) = (count.to_string(), ms.to_string());
        let lab_bin = self.lab_bin.clone();
        self.lab.spawn(name, "client", &lab_bin, &["hold", "--target", &target, "--count", &c, "--duration-ms", &ms, "--interval-ms", "100"])
    }

    /// Start `xlb-lab stream` (`rate` new connections per second to the lab
    /// VIP for `ms`) in the client namespace, as process `name`.
    pub fn spawn_stream(&mut self, name: &str, rate: u32, ms: u64) -> Result<()> {
        let target = format!("{VIP}:80");
        let (r, ms) = (rate.to_string(), ms.to_string());
        let lab_bin = self.lab_bin.clone();
        self.lab.spawn(name, "client", &lab_bin, &["stream", "--target", &target, "--rate", &r, "--duration-ms", &ms])
    }

    /// Start `xlb-lab probe` (`rate` UDP datagrams per second to the lab
    /// VIP's port `port` for `ms`, one flow) in the client namespace, as
    /// process `name`; its report is a `traffic::ProbeReport`.
    pub fn spawn_probe(&mut self, name: &str, port: u16, rate: u32, ms: u64) -> Result<()> {
        let target = format!("{VIP}:{port}");
        let (r, ms) = (rate.to_string(), ms.to_string());
        let lab_bin = self.lab_bin.clone();
        self.lab.spawn(name, "client", &lab_bin, &["probe", "--target", &target, "--rate", &r, "--duration-ms", &ms])
    }

    /// Wait for a background client (`spawn_hold`, `spawn_stream`, `spawn_probe`) to finish
    /// and parse the JSON report it prints.
    pub fn report<T: serde::de::DeserializeOwned>(&self, name: &str, limit: Duration) -> Result<T> {
        let mut line = None;
        self.wait(&format!("{name} to finish"), limit, || {
            line = self.lab.log(name).lines().find(|l| l.starts_with('[') || l.starts_with('{')).map(str::to_string);
            Ok(line.is_some())
        })?;
        serde_json::from_str(line.as_deref().unwrap_or("")).with_context(|| format!("{name}'s report"))
    }

    /// The XDP program attached to a role's eth0 (its id), if any.
    pub fn xdp_prog(&self, role: &str) -> Result<Option<u32>> {
        let out = lab::sh("ip", &["-n", &self.lab.ns(role), "-d", "link", "show", "eth0"])?;
        Ok(out.split_whitespace().skip_while(|w| !w.starts_with("prog/xdp")).nth(2).and_then(|id| id.parse().ok()))
    }

    /// Open `count` HTTP connections from the client to the VIP.
    pub fn connect(&self, count: usize) -> Result<Summary> {
        self.connect_to(&format!("{VIP}:80"), count)
    }

    /// Open `count` HTTP connections from the client to `target`.
    pub fn connect_to(&self, target: &str, count: usize) -> Result<Summary> {
        let out = self.lab.run(
            "client",
            &self.lab_bin,
            &["connect", "--target", target, "--count", &count.to_string(), "--parallel", "8", "--timeout-ms", "3000"],
        )?;
        if !out.status.success() {
            bail!("client failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).context("client summary is not JSON")
    }
}
