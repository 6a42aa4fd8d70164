//! A config file validated in full (`Desired`): what the agent should run.
//! Errors name the file's line.

use anyhow::{anyhow, Context, Result};
use std::{net::IpAddr, path::Path};

use super::*;

/// A backend as configured, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredBackend {
    /// Address.
    pub ip: IpAddr,
    /// MAC, if given.
    pub mac: Option<Mac>,
    /// Weight.
    pub weight: u32,
    /// Own health settings, if any.
    pub health: Option<HealthConfig>,
    /// Operator's state.
    pub state: Admin,
    /// Forwarding mode replacing the VIP's, if any.
    pub forward: Option<lb_common::Forward>,
}

/// A service as configured, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredVip {
    /// The service.
    pub vip: Vip,
    /// Algorithm.
    pub algo: lb_common::Algo,
    /// Source-hash persistence, seconds.
    pub persist: u16,
    /// Its own health settings, if any.
    pub health: Option<HealthConfig>,
    /// All-down behaviour.
    pub all_down: AllDown,
    /// Slow start, milliseconds.
    pub slow_start_ms: u64,
    /// Datapath options.
    pub opts: VipOpts,
    /// Forwarding mode of its backends.
    pub forward: lb_common::Forward,
    /// Backends.
    pub backends: Vec<DesiredBackend>,
}

/// A whole config file, validated: what the agent should run.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Desired {
    /// Agent-wide health settings.
    pub health: HealthConfig,
    /// Services.
    pub vips: Vec<DesiredVip>,
    /// Connection-table sync, if configured.
    pub sync: Option<sync::SyncSettings>,
}

/// 1-based number of the `nth` (0-based) line containing `needle`, or of the
/// first one.
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    let hits: Vec<usize> = text.lines().enumerate().filter(|(_, l)| l.contains(needle)).map(|(i, _)| i + 1).collect();
    hits.get(nth).or(hits.first()).copied().unwrap_or(0)
}

/// The line of `key = …` inside the entry that starts at line `from`
/// (1-based; up to the next `[` header), or `from` itself.
fn key_line(text: &str, from: usize, key: &str) -> usize {
    text.lines()
        .enumerate()
        .skip(from)
        .take_while(|(_, l)| !l.trim_start().starts_with('['))
        .find(|(_, l)| l.trim_start().strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')))
        .map(|(i, _)| i + 1)
        .unwrap_or(from)
}

impl Desired {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Desired> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        Desired::parse(&text, &path.display().to_string())
    }

    /// Validate a config text completely; errors name the line
    /// (`config ORIGIN line N: …`). Lines are looked up only for an error:
    /// searching the text for every entry would make a file of thousands
    /// of backends take seconds.
    pub fn parse(text: &str, origin: &str) -> Result<Desired> {
        let cfg: FileConfig = toml::from_str(text).map_err(|e| {
            let msg = e.to_string().replace('\n', " ");
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            match line {
                Some(l) => anyhow!("config {origin} line {l}: {msg}"),
                None => anyhow!("config {origin}: {msg}"),
            }
        })?;
        cfg.health.validate().map_err(|e| anyhow!("config {origin} line {}: [health]: {e}", line_of(text, "[health]", 0)))?;
        let mut vips = Vec::new();
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        let mut unique = std::collections::HashSet::new();
        for v in &cfg.vips {
            let n = seen.entry(v.address.clone()).or_default();
            let nth = *n;
            *n += 1;
            let vline = || line_of(text, &format!("\"{}\"", v.address), nth);
            let at = |line: usize, e: anyhow::Error| anyhow!("config {origin} line {line}: vip {}: {e:#}", v.address);
            let vip: Vip = v.address.parse().map_err(|e| at(vline(), e))?;
            if !unique.insert(vip) {
                return Err(at(vline(), anyhow!("duplicate VIP")));
            }
            let algo = parse_algo(v.algo.as_deref().unwrap_or("maglev")).map_err(|e| at(key_line(text, vline(), "algo"), e))?;
            let persist = check_persist(algo, v.persist_timeout.unwrap_or(0))
                .map_err(|e| at(key_line(text, vline(), "persist_timeout"), e))?;
            if let Some(h) = &v.health {
                h.validate().map_err(|e| at(line_of(text, "[vip.health]", vips.len()).max(vline()), e))?;
            }
            let slow_start_ms = v.slow_start_ms.unwrap_or(0);
            check_slow_start(slow_start_ms).map_err(|e| at(key_line(text, vline(), "slow_start_ms"), e))?;
            check_any_port_health(&vip, v.health.as_ref().unwrap_or(&cfg.health)).map_err(|e| at(vline(), e))?;
            let opts = VipOpts::from_fields(v.hash, v.answer_ping);
            opts.validate(algo).map_err(|e| at(key_line(text, vline(), "hash"), e))?;
            let forward = v
                .forward
                .as_deref()
                .map(str::parse::<ForwardName>)
                .transpose()
                .map_err(|e| at(key_line(text, vline(), "forward"), e))?
                .map_or(lb_common::Forward::L2, |f| f.0);
            let mut backends: Vec<DesiredBackend> = Vec::new();
            let mut seen_ips = std::collections::HashSet::new();
            for b in &v.backends {
                let bat = |key: &str, e: anyhow::Error| {
                    let bline = line_of(text, &format!("\"{}\"", b.ip), 0);
                    let line = if key.is_empty() { bline } else { key_line(text, bline, key) };
                    anyhow!("config {origin} line {line}: vip {} backend {}: {e:#}", v.address, b.ip)
                };
                let bforward = b
                    .forward
                    .as_deref()
                    .map(str::parse::<ForwardName>)
                    .transpose()
                    .map_err(|e| bat("forward", e))?
                    .map(|f| f.0);
                let ip = parse_backend_ip(&b.ip).map_err(|e| bat("", e))?;
                let ip = check_backend_ip_for(&vip, ip, bforward.unwrap_or(forward)).map_err(|e| bat("", e))?;
                if !seen_ips.insert(ip) {
                    return Err(bat("", anyhow!("duplicate backend")));
                }
                let mac = b.mac.as_deref().map(str::parse::<Mac>).transpose().map_err(|e| bat("mac", e))?;
                let weight = check_weight(b.weight.unwrap_or(DEFAULT_WEIGHT)).map_err(|e| bat("weight", e))?;
                if let Some(h) = &b.health {
                    h.validate().map_err(|e| bat("", e))?;
                }
                backends.push(DesiredBackend {
                    ip,
                    mac,
                    weight,
                    health: b.health.clone(),
                    state: b.state.unwrap_or_default(),
                    forward: bforward,
                });
            }
            vips.push(DesiredVip {
                vip,
                algo,
                persist,
                health: v.health.clone(),
                all_down: v.all_down.unwrap_or_default(),
                slow_start_ms,
                opts,
                forward,
                backends,
            });
        }
        let sync = match &cfg.sync {
            None => None,
            Some(c) => {
                let at = |e: anyhow::Error| anyhow!("config {origin} line {}: [sync]: {e:#}", line_of(text, "[sync]", 0));
                let peers = c.peers.iter().map(|p| p.parse()).collect::<Result<Vec<sync::SyncPeer>>>().map_err(at)?;
                let listen = c
                    .listen
                    .as_deref()
                    .map(|l| l.parse::<std::net::SocketAddr>().map_err(|_| anyhow!("invalid listen address '{l}': expected ADDR:PORT")))
                    .transpose()
                    .map_err(at)?;
                let s = sync::SyncSettings { peers, key_file: c.key_file.clone().into(), listen };
                s.validate().map_err(at)?;
                Some(s)
            }
        };
        Ok(Desired { health: cfg.health, vips, sync })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_line() {
        let text = "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n\n[[vip.backend]]\nip = \"10.0.0.2\"\n[[vip.backend]]\nip = \"10.0.0.3\"\nmac = \"zz\"\n";
        let e = Desired::parse(text, "t.toml").expect_err("bad MAC").to_string();
        assert!(e.starts_with("config t.toml line 8: ") && e.contains("invalid MAC"), "{e}");
        let e = Desired::parse("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n", "t").expect_err("dup").to_string();
        assert!(e.contains("line 4") && e.contains("duplicate VIP"), "{e}");
        let e = Desired::parse("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nweight = 3\n", "t").expect_err("unknown key").to_string();
        assert!(e.contains("line 3"), "{e}");
        let d = Desired::parse(text.replace("mac = \"zz\"\n", "state = \"drain\"\n").as_str(), "t").expect("valid");
        assert_eq!(d.vips[0].backends[1].state, Admin::Drain);
    }

    #[test]
    fn sync_section() {
        let base = "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n";
        let d = Desired::parse(&format!("{base}[sync]\npeers = [\"10.0.0.2\", \"10.0.0.3:9000\"]\nkey_file = \"/etc/xlb/sync.key\"\n"), "t").expect("valid");
        let s = d.sync.expect("sync");
        assert_eq!(s.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["10.0.0.2:7470", "10.0.0.3:9000"]);
        assert_eq!(s.key_file, std::path::PathBuf::from("/etc/xlb/sync.key"));
        let e = Desired::parse(&format!("{base}\n[sync]\npeers = [\"nope\"]\nkey_file = \"k\"\n"), "t").expect_err("bad peer").to_string();
        assert!(e.starts_with("config t line 4: [sync]: invalid sync peer 'nope'"), "{e}");
        let e = Desired::parse(&format!("{base}[sync]\npeers = []\nkey_file = \"k\"\n"), "t").expect_err("no peer").to_string();
        assert!(e.contains("at least one peer"), "{e}");
        assert!(Desired::parse(&format!("{base}[sync]\npeers = [\"10.0.0.2\"]\n"), "t").is_err(), "key_file is required");
        assert!(Desired::parse(base, "t").expect("valid").sync.is_none());
    }
}
