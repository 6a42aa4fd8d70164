//! Control-plane timings: Maglev table builds, API round trips, and the time
//! from a backend's death to its removal from the datapath.

use anyhow::Result;
use serde::Serialize;
use std::time::{Duration, Instant};
use xlb::{
    api::{self, Request},
    maglev,
};

use crate::scenario::Deployment;

/// Control-plane figures.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Control {
    /// (backends, ms) for a 65537-entry weighted Maglev table (median of 5).
    pub maglev_build_ms: Vec<(u32, f64)>,
    /// API round trip (`vip list`), µs: median and 99th percentile of 500.
    pub api_rtt_us: [f64; 2],
    /// Backend killed → marked down and out of the table, ms (3 trials).
    pub death_to_removal_ms: Vec<f64>,
}

/// Maglev build times.
pub fn maglev_builds() -> Vec<(u32, f64)> {
    [10u32, 100, 1000]
        .iter()
        .map(|&n| {
            let keys: Vec<[u8; 4]> = (0..n).map(|i| (0x0a00_0000 + i).to_be_bytes()).collect();
            let entries: Vec<maglev::Entry> = keys.iter().map(|k| maglev::Entry { key: k, weight: 1 + (k[3] as u32 % 3) }).collect();
            let mut t: Vec<f64> = (0..5)
                .map(|_| {
                    let s = Instant::now();
                    let _ = maglev::build(&entries, lb_common::DEFAULT_RING_SIZE);
                    s.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            t.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            (n, t[2])
        })
        .collect()
}

/// API round trips against a running agent.
pub fn api_rtt(d: &Deployment) -> Result<[f64; 2]> {
    let mut t = Vec::with_capacity(500);
    for _ in 0..500 {
        let s = Instant::now();
        api::call(&d.socket, &Request::VipList)?;
        t.push(s.elapsed().as_secs_f64() * 1e6);
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Ok([t[t.len() / 2], t[t.len() * 99 / 100]])
}

/// Kill backends' servers one at a time (the first `trials` of the lab's
/// backends, restarting each) and time their removal.
pub fn death_to_removal(d: &mut Deployment, lab_bin: &std::path::Path, trials: usize) -> Result<Vec<f64>> {
    let all: Vec<usize> = (1..=d.lab.backends).collect();
    let mut out = Vec::new();
    for i in 1..=trials.min(d.lab.backends) {
        d.wait_states(&all, Duration::from_secs(10))?;
        d.lab.kill(&format!("server{i}"))?;
        let up: Vec<usize> = all.iter().copied().filter(|&j| j != i).collect();
        out.push(d.wait_states(&up, Duration::from_secs(10))?.as_secs_f64() * 1e3);
        d.lab.spawn(&format!("server{i}"), &format!("b{i}"), lab_bin, &["serve", "--name", &format!("b{i}"), "--port", "80"])?;
    }
    Ok(out)
}
