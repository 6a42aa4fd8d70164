//! Routed backends, both ends: the balancer's encapsulation settings
//! (`--encap-source`, `--gue-port`) and `xlb decap` on backends (the
//! `xlb_decap` XDP program attached through a pinned link, so it runs
//! without any agent; its counters and VIP map pinned beside the link).

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::links::{FdLink, PinnedLink},
};
use lb_common::{EncapConfig, Stat, StatBlock, ENCAP_F_SRC4, ENCAP_F_SRC6, ENCAP_TTL, PROG_DECAP};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::maps::{AttachMode, Datapath, LoadOptions};

/// Encapsulation settings from `--encap-source` prefixes (at most one per
/// family; the flow hash fills the host bits, up to the last 32) and the
/// GUE port.
pub fn encap_config(sources: &[String], gue_port: u16) -> Result<EncapConfig> {
    if gue_port == 0 {
        bail!("--gue-port must not be 0");
    }
    let mut c = EncapConfig { gue_port_be: gue_port.to_be(), ttl: ENCAP_TTL, ..Default::default() };
    for s in sources {
        let (addr, len) = s.split_once('/').map_or((s.as_str(), None), |(a, l)| (a, Some(l)));
        let ip: IpAddr = addr.parse().map_err(|_| anyhow!("invalid --encap-source '{s}': expected an address or PREFIX/LEN"))?;
        crate::config::check_unicast(ip).with_context(|| format!("invalid --encap-source '{s}'"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u32 = match len {
            None => max,
            Some(l) => l.parse().ok().filter(|l| *l <= max).ok_or_else(|| anyhow!("invalid --encap-source '{s}': prefix length must be 0..={max}"))?,
        };
        let host_bits = (max - len).min(32);
        let vary = if host_bits == 0 { 0 } else { u32::MAX >> (32 - host_bits) };
        match ip {
            IpAddr::V4(a) => {
                if c.flags & ENCAP_F_SRC4 != 0 {
                    bail!("--encap-source: more than one IPv4 prefix");
                }
                c.src4 = (u32::from(a) & !vary).to_be_bytes();
                c.vary4 = vary;
                c.flags |= ENCAP_F_SRC4;
            }
            IpAddr::V6(a) => {
                if c.flags & ENCAP_F_SRC6 != 0 {
                    bail!("--encap-source: more than one IPv6 prefix");
                }
                let mut o = a.octets();
                let low = u32::from_be_bytes([o[12], o[13], o[14], o[15]]) & !vary;
                o[12..].copy_from_slice(&low.to_be_bytes());
                c.src6 = o;
                c.vary6 = vary;
                c.flags |= ENCAP_F_SRC6;
            }
        }
    }
    Ok(c)
}

/// Where `xlb decap` pins for an interface: `ROOT/decap-IFACE/{link,stats}`.
pub fn decap_dir(pin_root: &Path, iface: &str) -> PathBuf {
    pin_root.join(format!("decap-{}", crate::pin::iface_key(iface)))
}

/// The smallest maps the object loads with (the decap program uses only
/// the counters, the VIP set and the settings).
fn small_load() -> LoadOptions {
    LoadOptions { max_vips: 1, max_tables: 1, ring_size: 7, conntrack_size: 1024, persist_size: 1024, debug: false, flow_keys: false, quic_cid_len: Default::default() }
}

/// `xlb decap attach`: load the object, fill the VIP set, attach
/// `xlb_decap` to `iface` and pin the link and maps, so it keeps running
/// after the command exits. Replaces an earlier `xlb decap` on the interface.
pub fn attach(iface: &str, vips: &[IpAddr], gue_port: u16, pin_root: &Path, mode: Option<AttachMode>) -> Result<()> {
    if vips.is_empty() {
        bail!("give the host's VIPs with --vip ADDR (repeatable)");
    }
    for v in vips {
        crate::config::check_unicast(*v).with_context(|| format!("invalid --vip {v}"))?;
    }
    let cfg = encap_config(&[], gue_port)?;
    let dir = decap_dir(pin_root, iface);
    if dir.join("link").exists() {
        detach(iface, pin_root)?;
    }
    let mut dp = Datapath::load(small_load())?;
    dp.set_encap(&cfg)?;
    dp.set_decap_vips(vips)?;
    let prog = dp.program(PROG_DECAP)?;
    let id = match mode {
        Some(AttachMode::Generic) => prog.attach(iface, aya::programs::XdpMode::Skb),
        _ => prog.attach(iface, aya::programs::XdpMode::Driver),
    }
    .with_context(|| format!("cannot attach {PROG_DECAP} to {iface}"))?;
    let link = prog.take_link(id).context("cannot take the XDP link")?;
    let fd = FdLink::try_from(link).with_context(|| format!("XDP on {iface} is not attached through a BPF link"))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    dp.stats_map().pin(dir.join("stats")).with_context(|| format!("cannot pin the counters in {}", dir.display()))?;
    fd.pin(dir.join("link")).with_context(|| format!("cannot pin the XDP link in {}", dir.display()))?;
    Ok(())
}

/// `xlb decap detach`: remove the pins, which detaches the program.
pub fn detach(iface: &str, pin_root: &Path) -> Result<()> {
    let dir = decap_dir(pin_root, iface);
    let link = dir.join("link");
    if !link.exists() {
        bail!("no xlb decap on {iface} (nothing pinned at {})", dir.display());
    }
    let pinned = PinnedLink::from_pin(&link).context("cannot open the pinned link")?;
    pinned.unpin().context("cannot unpin the XDP link")?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(())
}

/// `xlb decap stats`: the decap program's verdict counters (summed over CPUs).
pub fn stats(iface: &str, pin_root: &Path) -> Result<Vec<(&'static str, u64)>> {
    let dir = decap_dir(pin_root, iface);
    let data = MapData::from_pin(dir.join("stats")).with_context(|| format!("no xlb decap on {iface} (nothing pinned at {})", dir.display()))?;
    let map: PerCpuArray<MapData, StatBlock> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    let per_cpu = map.get(&0, 0).context("cannot read the counters")?;
    let mut sums = [0u64; lb_common::stats::STAT_COUNT as usize];
    for b in per_cpu.iter() {
        for (o, v) in sums.iter_mut().zip(b.c.iter()) {
            *o += v;
        }
    }
    let decap = [Stat::Decapsulated, Stat::DecapNotTunnel, Stat::DecapNotLocal];
    debug_assert!(decap.iter().all(|s| s.is_verdict()));
    Ok(decap.iter().map(|s| (s.name(), sums[*s as usize])).collect())
}

/// One interface's `xlb decap` counters (in `xlb stats` and status).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecapStats {
    /// Interface it is attached to.
    pub iface: String,
    /// Its verdict counters by name.
    pub counters: BTreeMap<String, u64>,
}

/// The interface of a `decap-KEY` pin directory name when it belongs to
/// this network namespace (`suffix`: `pin::iface_key("")`, empty in the
/// initial namespace, else `@ns<inode>`).
fn decap_iface<'a>(dir: &'a str, suffix: &str) -> Option<&'a str> {
    let key = dir.strip_prefix("decap-")?;
    let iface = if suffix.is_empty() { key } else { key.strip_suffix(suffix)? };
    (!iface.is_empty() && !iface.contains('@')).then_some(iface)
}

/// The counters of every `xlb decap` of this network namespace pinned
/// under `pin_root` (none: an empty list), by interface.
pub fn decap_all(pin_root: &Path) -> Result<Vec<DecapStats>> {
    let Ok(dir) = std::fs::read_dir(pin_root) else { return Ok(Vec::new()) };
    let suffix = crate::pin::iface_key("");
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(iface) = decap_iface(&name, &suffix) else { continue };
        if !e.path().join("link").exists() {
            continue;
        }
        let counters = stats(iface, pin_root)?.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        out.push(DecapStats { iface: iface.to_string(), counters });
    }
    out.sort_by(|a, b| a.iface.cmp(&b.iface));
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn decap_pins_of_this_namespace_only() {
        assert_eq!(decap_iface("decap-eth0", ""), Some("eth0"));
        assert_eq!(decap_iface("decap-eth0@ns4026", ""), None, "another namespace's");
        assert_eq!(decap_iface("decap-eth0@ns4026", "@ns4026"), Some("eth0"));
        assert_eq!(decap_iface("decap-eth0@ns1", "@ns4026"), None);
        assert_eq!(decap_iface("decap-eth0", "@ns4026"), None, "the initial namespace's");
        assert_eq!(decap_iface("eth0", ""), None, "an agent's pins");
    }

    use super::*;

    #[test]
    fn sources_parse_to_prefix_and_host_bits() {
        let c = encap_config(&["10.9.8.7/24".into(), "fd00::1:2/112".into()], 6080).expect("valid");
        assert_eq!(c.src4, [10, 9, 8, 0]);
        assert_eq!(c.vary4, 0xff);
        assert_eq!(&c.src6[12..], &[0, 1, 0, 0], "host bits cleared");
        assert_eq!(c.vary6, 0xffff);
        assert_eq!(c.flags, ENCAP_F_SRC4 | ENCAP_F_SRC6);
        assert_eq!(u16::from_be(c.gue_port_be), 6080);
        let one = encap_config(&["10.0.0.1".into()], 1).expect("host");
        assert_eq!((one.src4, one.vary4), ([10, 0, 0, 1], 0));
        let wide = encap_config(&["fd00::/64".into()], 1).expect("wide");
        assert_eq!(wide.vary6, u32::MAX, "at most the last 32 bits vary");
        for bad in ["10.0.0.1/33", "banana", "224.0.0.1/32", "10.0.0.0/x"] {
            assert!(encap_config(&[bad.into()], 1).is_err(), "{bad}");
        }
        assert!(encap_config(&["10.0.0.1".into(), "10.0.0.2".into()], 1).is_err());
        assert!(encap_config(&[], 0).is_err());
    }
}
