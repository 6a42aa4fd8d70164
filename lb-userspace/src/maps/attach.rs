//! Attaching the balancer to an interface (directly, or through a pinned
//! XDP link it takes over atomically), and swapping the tracing variant in
//! and out of that link.

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::PerCpuValues,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        XdpMode,
    },
};
use lb_common::{
    trace::{TraceBucket, TraceConfig, TraceRecord},
    PROG_TRACE, PROG_XLB,
};

use super::{AttachMode, Datapath};

impl Datapath {
    /// Attach the balancer through the XDP link pinned at `link`: when one
    /// is pinned and still attached, replace its program atomically
    /// (bpf_link_update: no frame sees no program); otherwise attach anew
    /// and pin the link. Returns the mode (`None` when an existing link was
    /// taken over: its mode is kept) and whether a link was taken over.
    pub fn attach_pinned(&mut self, iface: &str, mode: Option<AttachMode>, link: &std::path::Path) -> Result<(Option<AttachMode>, bool)> {
        self.link_pin = Some(link.to_path_buf());
        if link.exists() {
            match self.replace_link(link) {
                Ok(()) => return Ok((None, true)),
                Err(e) => {
                    log::warn!("the pinned XDP link {} is unusable ({e:#}); attaching anew", link.display());
                    std::fs::remove_file(link).with_context(|| format!("cannot remove the stale link pin {}", link.display()))?;
                }
            }
        }
        let got = self.attach(iface, mode)?;
        let link_id = self.last_link.take().ok_or_else(|| anyhow!("no XDP link to pin"))?;
        let owned = self.program(PROG_XLB)?.take_link(link_id).context("cannot take the XDP link")?;
        // Kernels with bpf_loop (≥ 5.17, required) all attach XDP through a
        // BPF link, which is what can be pinned.
        let fd = FdLink::try_from(owned).with_context(|| format!("XDP on {iface} is not attached through a BPF link; run with --no-pin"))?;
        fd.pin(link).with_context(|| format!("cannot pin the XDP link at {}", link.display()))?;
        Ok((Some(got), false))
    }

    fn replace_link(&mut self, link: &std::path::Path) -> Result<()> {
        let pinned = PinnedLink::from_pin(link).context("cannot open the pinned link")?;
        let fd: FdLink = pinned.into();
        let xdp = XdpLink::try_from(fd).context("the pinned link is not an XDP link")?;
        let prog = self.program(PROG_XLB)?;
        // The link stays pinned; the program's copy of it closes on drop.
        prog.attach_to_link(xdp).context("bpf_link_update failed (the link is detached from its device?)")?;
        Ok(())
    }

    /// Make the interface's link run program `to` (`PROG_TRACE` while a
    /// trace runs, `PROG_XLB` otherwise): one bpf_link_update, as upgrades
    /// do; the maps are shared, so no flow notices.
    pub fn switch_program(&mut self, to: &'static str) -> Result<()> {
        if self.running == to {
            return Ok(());
        }
        let link = match (&self.link_pin, self.last_link.take()) {
            (Some(pin), _) => {
                let pinned = PinnedLink::from_pin(pin).context("cannot open the pinned link")?;
                XdpLink::try_from(FdLink::from(pinned)).context("the pinned link is not an XDP link")?
            }
            (None, Some(id)) => {
                let from = self.running;
                self.program(from)?.take_link(id).context("cannot take the XDP link")?
            }
            (None, None) => bail!("the program is not attached to an interface"),
        };
        let id = self.program(to)?.attach_to_link(link).with_context(|| format!("bpf_link_update to {to} failed"))?;
        if self.link_pin.is_some() {
            // The pin keeps the link: close this process's copy now.
            drop(self.program(to)?.take_link(id));
        } else {
            self.last_link = Some(id);
        }
        self.running = to;
        Ok(())
    }

    /// Start tracing: set the filter, fill every CPU's rate-limit bucket,
    /// empty the ring of an earlier trace, then swap the tracing program in.
    pub fn trace_start(&mut self, cfg: &TraceConfig) -> Result<()> {
        if self.running == PROG_TRACE {
            bail!("a trace is already running (one at a time)");
        }
        self.trace_arm(cfg)?;
        self.switch_program(PROG_TRACE)
    }

    /// Set the tracing program's filter and rate limit and empty its ring
    /// (`trace_start` without the swap: tests run `PROG_TRACE` directly).
    pub fn trace_arm(&mut self, cfg: &TraceConfig) -> Result<()> {
        self.trace_cfg.set(0, cfg, 0).context("cannot write the trace filter")?;
        let full = TraceBucket { credit_ns: cfg.burst_ns, last_ns: 0, missed: 0 };
        let v = PerCpuValues::try_from(vec![full; self.ncpus]).context("per-CPU values")?;
        self.trace_tb.set(0, v, 0).context("cannot reset the trace rate limit")?;
        while self.trace_ring.next().is_some() {}
        Ok(())
    }

    /// Up to `max` trace records, oldest first.
    pub fn trace_drain(&mut self, max: usize) -> Vec<TraceRecord> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.trace_ring.next() else { break };
            if item.len() >= std::mem::size_of::<TraceRecord>() {
                // SAFETY: the record was written by the tracing program as a
                // `TraceRecord` (repr(C), plain integers and bytes); read
                // unaligned from the ring's bytes.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TraceRecord>()) });
            }
        }
        out
    }

    /// Stop tracing: swap the balancer back in and turn the filter off.
    /// Returns the matching frames that were not recorded (rate limit or
    /// full ring).
    pub fn trace_stop(&mut self) -> Result<u64> {
        self.switch_program(PROG_XLB)?;
        self.trace_cfg.set(0, TraceConfig::default(), 0).context("cannot clear the trace filter")?;
        self.trace_missed()
    }

    /// Matching frames not recorded since the trace was armed.
    pub fn trace_missed(&self) -> Result<u64> {
        let per_cpu = self.trace_tb.get(&0, 0).context("cannot read the trace rate limit")?;
        Ok(per_cpu.iter().map(|b| b.missed).sum())
    }

    /// The program the interface's link runs.
    pub fn running_program(&self) -> &'static str {
        self.running
    }

    /// Attach the balancer to `iface`: native mode, or generic when `mode`
    /// allows falling back (`None`) and native is impossible.
    pub fn attach(&mut self, iface: &str, mode: Option<AttachMode>) -> Result<AttachMode> {
        let prog = self.program(PROG_XLB)?;
        let (id, got) = match mode {
            Some(AttachMode::Native) | None => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, AttachMode::Native),
                Err(e) if mode.is_none() => {
                    log::warn!("native XDP is not possible on {iface} ({e}); falling back to generic mode, which is much slower");
                    let id = prog
                        .attach(iface, XdpMode::Skb)
                        .with_context(|| format!("cannot attach XDP to {iface} in generic mode either"))?;
                    (id, AttachMode::Generic)
                }
                Err(e) => return Err(e).with_context(|| format!("cannot attach XDP to {iface} in native mode")),
            },
            Some(AttachMode::Generic) => {
                let id = prog
                    .attach(iface, XdpMode::Skb)
                    .with_context(|| format!("cannot attach XDP to {iface} in generic mode"))?;
                (id, AttachMode::Generic)
            }
        };
        self.last_link = Some(id);
        Ok(got)
    }
}
