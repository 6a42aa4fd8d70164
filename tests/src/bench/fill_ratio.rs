//! Full ÷ empty for new flows, measured so that the ratio means something:
//! an empty and a full table side by side, their new flows timed in
//! alternation (the order swapped every round), the ratio taken per round
//! and the median reported. Timed separately, minutes apart, the two
//! figures drift with the machine by more than the 15 % the target allows.

use anyhow::{bail, Result};
use lb_common::{Stat, PROG_XLB};

use super::cost::{agent, fill, median, median_spread, stat, warm_frame, Case, Floors, NEW_FLOW_REPEAT};

/// Rounds of one call per table.
const ROUNDS: u8 = 7;

/// The ratio of one family: its cases (empty and full, medians over the
/// rounds) and the median of the per-round ratios.
pub struct FullOverEmpty {
    pub cases: Vec<Case>,
    pub ratio: f64,
}

/// Alternated rounds for IPv4 (`v6` false) or IPv6 new flows, 3 backends.
pub fn alternated(fl: &mut Floors, floor_ns: &dyn Fn(&str) -> f64, v6: bool) -> Result<FullOverEmpty> {
    let vip = if v6 { "[fd00::100]:80/tcp" } else { "10.0.0.100:80/tcp" };
    let mut empty = agent(vip, 3)?;
    let mut full = agent(vip, 3)?;
    let capacity = full.dp.opts.conntrack_size;
    let entries = fill(&mut full, capacity)?;
    let name = if v6 { "v6_tcp_new_flow" } else { "v4_tcp_new_flow" };
    // The empty table takes ROUNDS × repeat flows: keep it below half full.
    let repeat = (NEW_FLOW_REPEAT / 2).min(capacity / 2 / ROUNDS as u32);
    let mut ns = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    let counts = |a: &xlb::agent::Agent| -> Result<[u64; 3]> { Ok([stat(a, Stat::CtMiss)?, stat(a, Stat::CtInsertFail)?, stat(a, Stat::CtEvicted)?]) };
    let before = [counts(&empty)?, counts(&full)?];
    for round in 0..ROUNDS {
        let mut this = [0.0; 2];
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let a = if which == 0 { &mut empty } else { &mut full };
            let fd = a.dp.program(PROG_XLB)?.fd()?.try_clone()?;
            // Ranges 20.. keep clear of every other warm call's sources.
            let (k, verdict) = fl.warm_once(&fd, &warm_frame(v6, 20 + round), repeat)?;
            if verdict != 3 {
                bail!("{name} (alternated): verdict {verdict}, expected XDP_TX");
            }
            this[which] = k;
            ns[which].push(k);
        }
        ratios.push(this[1] / this[0]);
    }
    let want = ROUNDS as u64 * repeat as u64;
    let mut cases = Vec::new();
    for (which, a) in [(0, &empty), (1, &full)] {
        let after = counts(a)?;
        let [misses, fails, evicted] = [0, 1, 2].map(|i| after[i] - before[which][i]);
        if misses != want || fails != 0 {
            bail!("{name} (alternated): {misses} misses and {fails} failed inserts for {want} new flows");
        }
        let (m, [lo, hi]) = median_spread(std::mem::take(&mut ns[which]));
        let state = if which == 0 { "empty (alternated with full)".to_string() } else { format!("full ({entries} entries, alternated with empty)") };
        let proof = format!("conntrack_miss +{misses}, insert failures 0, open entries evicted +{evicted}; {ROUNDS} rounds × {repeat} new flows");
        cases.push(Case::new(&format!("{name}_alternated"), 3, &state, (m, [lo, hi], m), "floor_one_line", floor_ns, proof));
    }
    let per_round = ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ");
    let ratio = median(&mut ratios);
    if let Some(c) = cases.last_mut() {
        c.verified.push_str(&format!("; full ÷ empty per round {per_round}, median {ratio:.2}"));
    }
    Ok(FullOverEmpty { cases, ratio })
}
