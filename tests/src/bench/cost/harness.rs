//! The timing harness: a measured case, the N/2N and loop methods, and the
//! floors object with its new-flow wrapper.

use super::*;

/// One measured case.
#[derive(Serialize, Debug, Clone)]
pub struct Case {
    /// Case name.
    pub case: String,
    /// Backends of the VIP (0 for floors).
    pub backends: u32,
    /// Connection table state: "empty", "50 % (N entries)" or "full (N
    /// entries)" of its capacity, "-" for floors.
    pub conntrack: String,
    /// Cost per packet, ns (median of runs).
    pub ns_per_pkt: f64,
    /// Fastest and slowest run, ns.
    pub spread_ns: [f64; 2],
    /// The kernel's own per-run average (1 ns resolution), median.
    pub kernel_avg_ns: f64,
    /// The floor it is compared to.
    pub floor: String,
    /// ns_per_pkt ÷ the floor's.
    pub ratio: f64,
    /// What the counters proved.
    pub verified: String,
}

impl Case {
    /// A floor: its own reference (ratio 1).
    pub(super) fn floor(name: &str, ns: f64, spread: [f64; 2], kernel: f64, verified: String) -> Case {
        Case {
            case: name.into(),
            backends: 0,
            conntrack: "-".into(),
            ns_per_pkt: ns,
            spread_ns: spread,
            kernel_avg_ns: kernel,
            floor: name.into(),
            ratio: 1.0,
            verified,
        }
    }

    /// A case of `backends` backends compared to `floor` (whose cost `floor_ns` gives).
    pub(crate) fn new(case: &str, backends: u32, ct: &str, (ns, spread, k): (f64, [f64; 2], f64), floor: &str, floor_ns: &dyn Fn(&str) -> f64, verified: String) -> Case {
        Case {
            case: case.into(),
            backends,
            conntrack: ct.into(),
            ns_per_pkt: ns,
            spread_ns: spread,
            kernel_avg_ns: k,
            floor: floor.into(),
            ratio: ns / floor_ns(floor),
            verified,
        }
    }
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Time `repeat` runs of a frame: (wall ns, kernel average ns, return value).
pub(crate) fn timed(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<(f64, f64, u32)> {
    let mut out = vec![0u8; frame.len() + 256];
    let t = Instant::now();
    let r = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() })?;
    Ok((t.elapsed().as_nanos() as f64, r.duration.as_nanos() as f64, r.return_value))
}

/// One N/2N measurement: (wall ns per run, kernel average of the 2N call).
fn n_2n(prog: &Xdp, frame: &[u8], want: u32) -> Result<(f64, f64)> {
    let (t1, _, r1) = timed(prog, frame, N)?;
    let (t2, k2, r2) = timed(prog, frame, 2 * N)?;
    if r1 != want || r2 != want {
        bail!("verdict {r1}/{r2}, expected {want}");
    }
    Ok((((t2 - t1) / N as f64).max(0.0), k2))
}

/// Median and [min, max] of per-run figures.
pub(crate) fn median_spread(mut per: Vec<f64>) -> (f64, [f64; 2]) {
    let (lo, hi) = per.iter().fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
    (median(&mut per), [lo, hi])
}

/// The N/2N method; returns (median, [min, max], kernel median).
pub(super) fn repeat_cost(prog: &Xdp, frame: &[u8], want: u32) -> Result<(f64, [f64; 2], f64)> {
    let (mut per, mut kern) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (c, k) = n_2n(prog, frame, want)?;
        per.push(c);
        kern.push(k);
    }
    let (m, spread) = median_spread(per);
    Ok((m, spread, median(&mut kern)))
}

/// The N/2N method on a case and its floor in alternation (the order
/// swapped every run): the case's (median, [min, max], kernel median) and
/// the median of the per-run ratios case ÷ floor. A floor of a few ns moves
/// by 1–2 ns between runs minutes apart; paired runs cancel that drift.
pub(super) fn paired_cost(case: (&Xdp, &[u8], u32), floor: (&Xdp, &[u8], u32)) -> Result<(f64, [f64; 2], f64, f64)> {
    let (mut per, mut kern, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let ((c, k), f) = if run % 2 == 0 {
            let c = n_2n(case.0, case.1, case.2)?;
            (c, n_2n(floor.0, floor.1, floor.2)?.0)
        } else {
            let f = n_2n(floor.0, floor.1, floor.2)?.0;
            (n_2n(case.0, case.1, case.2)?, f)
        };
        per.push(c);
        kern.push(k);
        ratios.push(if f > 0.0 { c / f } else { f64::NAN });
    }
    let (m, spread) = median_spread(per);
    Ok((m, spread, median(&mut kern), median(&mut ratios)))
}

/// Sum of the kernel-reported durations of repeat-1 runs over `frames`.
pub(super) fn loop_cost(prog: &Xdp, frames: &[Vec<u8>], want: u32) -> Result<f64> {
    let mut total = 0f64;
    for f in frames {
        let (_, k, r) = timed(prog, f, 1)?;
        if r != want {
            bail!("verdict {r}, expected {want}");
        }
        total += k;
    }
    Ok(total)
}

/// The floors object's programs and its table.
pub struct Floors {
    ebpf: Ebpf,
    pub(super) next: ProgramArray<MapData>,
}

impl Floors {
    /// Load the floors object and fill its stateless table.
    pub fn load(path: &str) -> Result<Floors> {
        let obj = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        let mut ebpf = EbpfLoader::new().load(&obj).context("loading the floors object")?;
        for name in
            ["floor_pass", "floor_macswap_tx", "floor_stateless_dsr", "floor_one_line", "floor_one_line_ct", "floor_work", "floor_one_line_nudge", "floor_one_line_work", "floor_ct_insert", "floor_lru_insert", "bench_gen", "bench_sink", "new_flows"]
        {
            let p: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?;
            p.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        let mut ring: Array<_, [u8; 8]> = Array::try_from(ebpf.map_mut("FLOOR_RING").ok_or_else(|| anyhow!("no ring"))?)?;
        for i in 0..DEFAULT_RING_SIZE {
            ring.set(i, [2, 0, 0, 0, 1, (i % 3) as u8 + 1, 0, 0], 0)?;
        }
        let next = ProgramArray::try_from(ebpf.take_map("FLOOR_NEXT").ok_or_else(|| anyhow!("no FLOOR_NEXT"))?)?;
        Ok(Floors { ebpf, next })
    }

    /// Warm new flows into `target` (see the module doc): kernel average
    /// per run, median and [min, max] over RUNS calls; `frame(run)` must give
    /// each call its own source range.
    pub(super) fn warm_new_flows(&mut self, target: &ProgramFd, frame: &dyn Fn(u8) -> Vec<u8>, repeat: u32, want: u32) -> Result<(f64, [f64; 2])> {
        self.next.set(0, target, 0).context("FLOOR_NEXT")?;
        let wrapper = self.prog("new_flows")?;
        let mut per = Vec::new();
        for run in 0..RUNS {
            let (_, k, r) = timed(wrapper, &frame(run as u8), repeat)?;
            if r != want {
                bail!("new flows: verdict {r}, expected {want}");
            }
            per.push(k);
        }
        Ok(median_spread(per))
    }

    /// One call of warm new flows into `target`: the kernel's average per
    /// run, and the verdict.
    pub(crate) fn warm_once(&mut self, target: &ProgramFd, frame: &[u8], repeat: u32) -> Result<(f64, u32)> {
        self.next.set(0, target, 0).context("FLOOR_NEXT")?;
        let (_, k, r) = timed(self.prog("new_flows")?, frame, repeat)?;
        Ok((k, r))
    }

    /// A floor program.
    pub fn prog(&self, name: &str) -> Result<&Xdp> {
        Ok(self.ebpf.program(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?)
    }
}
