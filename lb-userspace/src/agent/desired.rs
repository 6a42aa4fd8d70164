//! The declarative config: apply a desired state (exactly the difference,
//! each VIP published once), dump the running one.

use anyhow::{bail, Result};
use lb_common::{Algo, Forward};
use std::{collections::BTreeMap, net::IpAddr};

use super::{check_backends_per_vip, Agent, Maps, VipSpec};
use crate::config::{self, Admin, AllDown, Desired, FileConfig, Mac, Vip};

impl<M: Maps> Agent<M> {
    /// Make the running state what `d` says, changing only what differs;
    /// returns a line per change. `d` is fully validated; capacity is checked
    /// before anything is touched. Every VIP that changes is published once,
    /// and the state file saved once, at the end.
    pub fn apply_desired(&mut self, d: &Desired) -> Result<Vec<String>> {
        let mut changes = Vec::new();
        let wanted: BTreeMap<Vip, &config::DesiredVip> = d.vips.iter().map(|v| (v.vip, v)).collect();
        let new_vips = wanted.keys().filter(|v| !self.vips.contains_key(v)).count();
        let freed_vips = self.vips.keys().filter(|v| !wanted.contains_key(v)).count();
        if new_vips > self.free_vip_ids.len() + freed_vips {
            let max = self.dp.opts().max_vips;
            bail!("the config has {} VIPs; the limit is {max} (raise it with `xlb agent --max-vips`)", d.vips.len());
        }
        let new_backends: usize = d
            .vips
            .iter()
            .map(|dv| dv.backends.iter().filter(|b| self.vips.get(&dv.vip).is_none_or(|s| !s.backends.contains_key(&b.ip))).count())
            .sum();
        let freed_backends: usize = self
            .vips
            .iter()
            .map(|(v, s)| s.backends.keys().filter(|ip| wanted.get(v).is_none_or(|dv| !dv.backends.iter().any(|b| b.ip == **ip))).count())
            .sum();
        if new_backends > self.free_backend_ids.len() + freed_backends {
            bail!(
                "the config adds {new_backends} backends; {} of the {} backend entries are free (a fixed limit)",
                self.free_backend_ids.len() + freed_backends,
                lb_common::MAX_BACKENDS
            );
        }
        for dv in &d.vips {
            check_backends_per_vip(&dv.vip, dv.algo, dv.backends.len())?;
        }
        super::check_tables(&self.dp.opts(), d.vips.iter().filter(|v| !v.backends.is_empty()).count())?;
        // Agent-wide health settings, inherited by VIPs without their own.
        if d.health != self.opts.health {
            self.opts.health = d.health.clone();
            changes.push("agent health settings changed".to_string());
            let inherit: Vec<Vip> = self.vips.iter().filter(|(_, s)| !s.health_explicit).map(|(v, _)| *v).collect();
            for v in inherit {
                if let Some(s) = self.vips.get_mut(&v) {
                    s.health = d.health.clone();
                }
                self.mark(v);
            }
        }
        let gone: Vec<Vip> = self.vips.keys().filter(|v| !wanted.contains_key(v)).copied().collect();
        for v in gone {
            self.remove_vip(&v)?;
            changes.push(format!("vip {v} removed"));
        }
        for dv in &d.vips {
            let vip = dv.vip;
            if !self.vips.contains_key(&vip) {
                let spec = VipSpec {
                    algo: dv.algo,
                    persist: dv.persist,
                    health: dv.health.clone(),
                    all_down: dv.all_down,
                    slow_start_ms: dv.slow_start_ms,
                    opts: dv.opts,
                    forward: dv.forward,
                };
                self.insert_vip(vip, &spec)?;
                changes.push(format!("vip {vip} added"));
            } else {
                let s = self.vips.get_mut(&vip).expect("present");
                let health = dv.health.clone().unwrap_or_else(|| self.opts.health.clone());
                if s.algo != dv.algo
                    || s.persist_secs != dv.persist
                    || s.all_down != dv.all_down
                    || s.health != health
                    || s.health_explicit != dv.health.is_some()
                    || s.opts != dv.opts
                {
                    super::check_any_port_health(&vip, &health)?;
                    let stops_answering = s.opts.answer_ping && !dv.opts.answer_ping;
                    s.opts = dv.opts;
                    s.algo = dv.algo;
                    s.persist_secs = dv.persist;
                    s.all_down = dv.all_down;
                    s.health = health;
                    s.health_explicit = dv.health.is_some();
                    changes.push(format!("vip {vip} settings changed"));
                    self.mark(vip);
                    if stops_answering {
                        self.sync_echo(&vip, true)?;
                    }
                }
                let s = self.vips.get_mut(&vip).expect("present");
                if s.forward != dv.forward {
                    s.forward = dv.forward;
                    changes.push(format!("vip {vip} forward {}", dv.forward));
                    self.mark(vip);
                }
                let s = self.vips.get_mut(&vip).expect("present");
                if s.slow_start_ms != dv.slow_start_ms {
                    s.slow_start_ms = dv.slow_start_ms;
                    changes.push(format!("vip {vip} slow start {} ms", dv.slow_start_ms));
                    self.mark(vip);
                }
            }
            let s = &self.vips[&vip];
            let extra: Vec<IpAddr> = s.backends.keys().filter(|ip| !dv.backends.iter().any(|b| b.ip == **ip)).copied().collect();
            if !extra.is_empty() {
                self.remove_backends(&vip, &extra)?;
                for ip in extra {
                    changes.push(format!("vip {vip} backend {ip} removed"));
                }
            }
            // Added in groups of one forwarding mode (one table publication).
            for fwd in [None, Some(Forward::L2), Some(Forward::Ipip), Some(Forward::Gue)] {
                let add: Vec<(IpAddr, Option<Mac>, u32)> = dv
                    .backends
                    .iter()
                    .filter(|b| b.forward == fwd && !self.vips[&vip].backends.contains_key(&b.ip))
                    .map(|b| (b.ip, b.mac, b.weight))
                    .collect();
                if !add.is_empty() {
                    self.insert_backends(&vip, &add, fwd)?;
                    for (ip, _, _) in &add {
                        changes.push(format!("vip {vip} backend {ip} added"));
                    }
                }
            }
            for b in &dv.backends {
                let vip_forward = self.vips[&vip].forward;
                let be = self.vips.get_mut(&vip).expect("present").backends.get_mut(&b.ip).expect("present");
                let effective = b.forward.unwrap_or(vip_forward);
                if be.forward_cfg != b.forward || be.forward != effective {
                    config::check_backend_ip_for(&vip, b.ip, effective)?;
                    be.forward_cfg = b.forward;
                    be.forward = effective;
                    changes.push(format!("vip {vip} backend {} forward {effective}", b.ip));
                    self.mark(vip);
                }
                let cur = &self.vips[&vip].backends[&b.ip];
                if cur.check != b.health {
                    self.change_backend_check(&vip, b.ip, b.health.clone())?;
                    changes.push(format!("vip {vip} backend {} health settings changed", b.ip));
                }
                let cur = &self.vips[&vip].backends[&b.ip];
                if cur.mac_cfg != b.mac {
                    let neighbour = self.neighbours.get(b.ip);
                    let be = self.vips.get_mut(&vip).expect("present").backends.get_mut(&b.ip).expect("present");
                    be.mac_cfg = b.mac;
                    be.mac = b.mac.or(neighbour);
                    changes.push(format!("vip {vip} backend {} MAC changed", b.ip));
                    self.mark(vip);
                }
                let cur = &self.vips[&vip].backends[&b.ip];
                if cur.server_id != b.server_id {
                    changes.push(format!("vip {vip} backend {} server ID {}", b.ip, b.server_id.map_or("none".into(), |i| i.to_string())));
                }
                let cur = &self.vips[&vip].backends[&b.ip];
                if cur.weight != b.weight || cur.admin != b.state {
                    changes.push(format!("vip {vip} backend {} weight {} {:?} → {} {:?}", b.ip, cur.weight, cur.admin, b.weight, b.state));
                    let state = self.vips.get_mut(&vip).expect("present");
                    super::backends::change_backend(&vip, state, b.ip, Some(b.weight), Some(b.state))?;
                    self.mark(vip);
                }
            }
        }
        // Server IDs, each VIP's all at once (two backends may swap theirs).
        for dv in &d.vips {
            let ids: Vec<_> = dv.backends.iter().map(|b| (b.ip, b.server_id)).collect();
            self.set_server_ids(&dv.vip, &ids)?;
        }
        self.flush()?;
        if changes.len() > 20 {
            log::info!("config: {} changes ({} …)", changes.len(), changes[..3].join("; "));
        } else {
            for c in &changes {
                log::info!("config: {c}");
            }
        }
        Ok(changes)
    }

    /// Read a config file, validate it completely, then apply exactly its
    /// difference from the running state (a file with any error changes
    /// nothing). `config reload` and SIGHUP.
    pub fn reload(&mut self, path: &std::path::Path) -> Result<Vec<String>> {
        let desired = Desired::load(path)?;
        self.apply_desired(&desired)
    }

    /// The running state as a config file that reproduces it.
    pub fn dump(&self) -> FileConfig {
        let vips = self.vips.iter().map(|(v, s)| vip_config(v, s)).collect();
        FileConfig { health: self.opts.health.clone(), vips, sync: None }
    }

    /// `dump` rendered as TOML, as the state file keeps it. Rendering 512
    /// VIPs takes ~15 ms, so each VIP's text is kept until the VIP changes
    /// (`mark`): a request re-renders one VIP, not all of them.
    pub fn dump_toml(&self) -> Result<String> {
        #[derive(serde::Serialize)]
        struct Health<'a> {
            health: &'a config::HealthConfig,
        }
        #[derive(serde::Serialize)]
        struct OneVip {
            vip: [config::VipConfig; 1],
        }
        let mut out = toml::to_string(&Health { health: &self.opts.health })?;
        let mut cache = self.toml_cache.borrow_mut();
        for (v, s) in &self.vips {
            if !cache.contains_key(v) {
                cache.insert(*v, toml::to_string(&OneVip { vip: [vip_config(v, s)] })?);
            }
            out.push('\n');
            out.push_str(&cache[v]);
        }
        Ok(out)
    }
}

/// A VIP as the config file writes it.
fn vip_config(v: &Vip, s: &super::VipState) -> config::VipConfig {
    config::VipConfig {
        address: v.to_string(),
        algo: (s.algo != Algo::Maglev).then(|| s.algo.name().to_string()),
        persist_timeout: (s.persist_secs > 0).then_some(s.persist_secs as u32),
        health: s.health_explicit.then(|| s.health.clone()),
        all_down: (s.all_down != AllDown::Drop).then_some(s.all_down),
        slow_start_ms: (s.slow_start_ms > 0).then_some(s.slow_start_ms),
        hash: (s.opts.hash != config::HashMode::FiveTuple).then_some(s.opts.hash),
        answer_ping: s.opts.answer_ping.then_some(true),
        quic: s.opts.quic.then_some(true),
        forward: s.forward.is_routed().then(|| s.forward.name().to_string()),
        backends: s
            .backends
            .values()
            .map(|b| config::BackendConfig {
                ip: b.ip.to_string(),
                mac: b.mac_cfg.map(|m| m.to_string()),
                weight: (b.weight != config::DEFAULT_WEIGHT).then_some(b.weight),
                health: b.check.clone(),
                state: (b.admin != Admin::Ready).then_some(b.admin),
                forward: b.forward_cfg.map(|f| f.name().to_string()),
                server_id: b.server_id,
            })
            .collect(),
    }
}
