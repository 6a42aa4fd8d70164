//! REPORT.md and the PNG plot from one run's results.

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use std::{fmt::Write, path::Path};

use super::Results;

/// A Markdown report.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# xlb benchmark report\n");
    let _ = writeln!(
        s,
        "Machine: {} × {}, {} GiB, kernel {}, {}. One run of `cargo xtask bench`.\n",
        m["cpus"], m["cpu"].as_str().unwrap_or("?"), m["memory_gib"], m["kernel"].as_str().unwrap_or("?"), m["date"].as_str().unwrap_or("?")
    );
    let _ = writeln!(s, "## Targets (ratios measured in this run)\n\n| target | ratio | limit | met |\n|---|---:|---:|---|");
    for t in &r.targets {
        let _ = writeln!(s, "| {} | {:.2} | {} {} | {} |", t.name, t.ratio, if t.at_least { "≥" } else { "≤" }, t.limit, if t.met { "yes" } else { "**no**" });
    }
    let _ = writeln!(s, "\n## Per-packet cost (BPF_PROG_TEST_RUN on the real program)\n");
    let _ = writeln!(s, "| case | backends | connection table | ns/packet | spread (ns) | kernel avg (ns) | floor | ratio | proof |\n|---|---:|---|---:|---|---:|---|---:|---|");
    for c in &r.cases {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.1}–{:.1} | {:.0} | {} | {:.2} | {} |",
            c.case, c.backends, c.conntrack, c.ns_per_pkt, c.spread_ns[0], c.spread_ns[1], c.kernel_avg_ns, c.floor, c.ratio, c.verified
        );
    }
    new_flow_table(&mut s, r);
    let _ = writeln!(
        s,
        "\nFor scale (from the issue): a well-known C XDP balancer on this harness took about 28 ns for non-VIP traffic, 66 ns for an established flow and 143 ns for a new flow, against 5 ns for `floor_macswap_tx` and 18 ns for `floor_stateless_dsr` (ratios 3.7 and 7.9 to the stateless floor)."
    );
    for l in &r.live {
        let mix = if l.flows == 0 { "every frame a new flow".to_string() } else { format!("{} flows", l.flows) };
        let _ = writeln!(s, "\n## Live traffic ({}-byte frames, {mix}, live frames over a veth)\n", l.frame_bytes);
        let _ = writeln!(s, "| mode | drop-free rate (frames/s) | highest forwarding rate (frames/s) |\n|---|---:|---:|");
        for m in &l.modes {
            let _ = writeln!(s, "| {} | {:.0} | {:.0} |", m.mode, m.drop_free_pps, m.max_forwarded_pps);
        }
        let _ = writeln!(s, "\nxlb ÷ reflector: drop-free {:.2}, highest rate {:.2}.", l.ratio_drop_free, l.ratio_max);
        let rate = |name: &str| l.modes.iter().find(|m| m.mode == name).map(|m| m.drop_free_pps);
        for floor in ["floor_one_line", "floor_one_line_work"] {
            if let (Some(x), Some(f)) = (rate("xlb"), rate(floor)) {
                let _ = writeln!(s, "xlb ÷ `{floor}` in xlb's place: drop-free {:.2} (per frame: xlb {:.0} ns, floor {:.0} ns at the drop-free rates).", x / f.max(1.0), 1e9 / x.max(1.0), 1e9 / f.max(1.0));
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "| mode | offered | sent/s | returned/s | xlb forwarded/s | xlb new flows/s (conntrack_miss) | loss |\n|---|---:|---:|---:|---:|---:|---:|");
        for m in &l.modes {
            for st in &m.steps {
                let offered = if st.offered_pps == 0.0 { "max".to_string() } else { format!("{:.0}", st.offered_pps) };
                let fwd = st.lb_forwarded_pps.map(|f| format!("{f:.0}")).unwrap_or_else(|| "-".into());
                let new = st.lb_new_flows_pps.map(|f| format!("{f:.0}")).unwrap_or_else(|| "-".into());
                let _ = writeln!(s, "| {} | {offered} | {:.0} | {:.0} | {fwd} | {new} | {:.3}% |", m.mode, st.sent_pps, st.received_pps, st.loss * 100.0);
            }
        }
    }
    if r.live.is_empty() {
        let _ = writeln!(s, "\n## Live traffic\n\nNot measured in this run (see the bench's output).");
    }
    let _ = writeln!(s, "\n## Real clients: nginx, ab, iperf3 (same namespaces, same run)\n");
    let _ = writeln!(s, "| mode | ab connections/s | × stateless | busy CPU µs per connection (machine) | balancer CPU µs per connection | failed | iperf3 Gbit/s | × stateless |\n|---|---:|---:|---:|---:|---:|---:|---:|");
    let stateless = r.compare.iter().find(|c| c.mode == "stateless");
    for c in &r.compare {
        // Below the baseline cannot be a cost: tick-based CPU accounting
        // undercounts a machine that is not saturated (a latency-bound run).
        let lb = if c.lb_cpu_us_per_conn < 0.0 { "n/a (run not CPU-bound)".to_string() } else { format!("{:.1}", c.lb_cpu_us_per_conn) };
        let x_conns = stateless.map(|f| format!("{:.2}", c.conns_per_sec / f.conns_per_sec)).unwrap_or_default();
        let gbps = c.iperf_gbps.map(|g| format!("{g:.2}")).unwrap_or_else(|| "-".into());
        let x_gbps = match (c.iperf_gbps, stateless.and_then(|f| f.iperf_gbps)) {
            (Some(g), Some(f)) => format!("{:.2}", g / f),
            _ => "-".into(),
        };
        let _ = writeln!(s, "| {} | {:.0} | {x_conns} | {:.1} | {lb} | {} | {gbps} | {x_gbps} |", c.mode, c.conns_per_sec, c.cpu_us_per_conn, c.failed);
    }
    let _ = writeln!(s, "\n## Control plane\n");
    for (n, ms) in &r.control.maglev_build_ms {
        let _ = writeln!(s, "- Maglev table (65537 entries), {n} backends: {ms:.2} ms");
    }
    let _ = writeln!(s, "- API round trip (`vip list`): median {:.0} µs, p99 {:.0} µs", r.control.api_rtt_us[0], r.control.api_rtt_us[1]);
    let d: Vec<String> = r.control.death_to_removal_ms.iter().map(|m| format!("{m:.0}")).collect();
    let _ = writeln!(s, "- Backend killed → down and out of the table: {} ms (defaults: interval 300 ms, fall 3, timeout 250 ms; polled every 50 ms)", d.join(", "));
    if let Some(sc) = &r.scale {
        let _ = writeln!(s, "\n## Control plane at scale\n");
        let _ = writeln!(s, "Issue: the figures the issue measured on the first agent (60 VIPs × 3 shared backends through the CLI). Before: the quiet run of 2026-12-02 09:15 (main at 4f6228e: glibc static-PIE `xlb`, the plain Maglev fill, no `--no-wait`; REPORT.md). Now: this run.\n");
        let _ = writeln!(s, "| figure | issue | before | now | target |\n|---|---:|---:|---:|---|");
        let _ = writeln!(s, "| write one table (65 537 entries) | 76–110 ms (a syscall per entry) | mmap 0.017 ms (into a preallocated slot) | per entry {:.1} ms; a new table created and filled: batch {:.2} ms, **mmap {:.3} ms** | |", sc.write_per_entry_ms, sc.write_batch_ms, sc.write_mmap_ms);
        let _ = writeln!(s, "| one table change, request → published (`backend set --weight`, new weights) | 76–110 ms | median 1.11 ms, max 2.55 ms | median {:.2} ms, max {:.2} ms (answered once published, the state file written right after: median {:.2} ms, max {:.2} ms) | < 2 ms |", sc.table_change_ms[0], sc.table_change_ms[1], sc.table_change_answer_ms[0], sc.table_change_answer_ms[1]);
        if let Some(x) = &sc.shared_512 {
            let _ = writeln!(s, "| 512 VIPs × 3 from a file (`config reload`) | — | 133 ms | {:.0} ms (all up {:.0} ms later) | < 2 s |", x.reload_ms, x.all_up_ms - x.reload_ms);
            let _ = writeln!(s, "| check jobs; checks/s over {:.0} s | one per (VIP, backend) | 3; 29.5/s | {}; {:.1}/s (targets / interval = {:.1}) | = targets / interval |", x.steady_s, x.check_jobs, x.checks_per_s, x.expected_checks_per_s);
            let _ = writeln!(s, "| false downs in steady state; MAC/netlink errors in the log | backends flapping; 940 warnings/min at 60 VIPs | 0; 0 | {} transitions; {} lines | 0; 0 |", x.false_transitions, x.netlink_errors);
            if let Some(ms) = x.removal_ms {
                let _ = writeln!(s, "| shared backend killed → out of all 512 tables (interval = fast = 100 ms, fall 3; last table's publication time) | 24 of 60 VIPs after 30 s | 313 ms | {ms:.0} ms (seen by polling: {:.0} ms) | ≤ {:.0} ms |", x.removal_seen_ms.unwrap_or(f64::NAN), x.removal_bound_ms);
            }
        }
        if let Some(t) = sc.cli_512_s {
            let load = sc.cli_load.map(|l| format!(" (load average {l:.1} at its start)")).unwrap_or_default();
            let _ = writeln!(s, "| 512 VIPs × 3 through the CLI, one command at a time (2 048 commands) | 18.6 s for 60 VIPs | 4.7 s | {t:.1} s{load} | < 10 s |");
        }
        if let Some([start, noop, set]) = sc.cli_split_ms {
            let _ = writeln!(s, "| one CLI command at 512 VIPs (medians): process start (`--version`); + connect and a no-op request (`vip list`); + a table change (`backend set --weight`) | — | 1.23 ms; 2.19 ms; 2.85 ms | {start:.1} ms; {noop:.1} ms; {set:.1} ms | |");
        }
        if let Some(ms) = sc.reload_64x100_ms {
            let _ = writeln!(s, "| 64 VIPs × 100 backends from a file (configured MACs, no checks) | — | 127 ms | {ms:.0} ms | < 2 s |");
        }
        if let Some(t) = sc.cli_64x100_s {
            let load = sc.cli_64x100_load.map(|l| format!(", load average {l:.1} at its start")).unwrap_or_default();
            let floor = sc.cli_64x100_floor_s.map(|f| format!(" (6 464 × `xlb --version` alone: {f:.1} s{load})")).unwrap_or_default();
            let _ = writeln!(s, "| 64 VIPs × 100 backends through the CLI, one command at a time (6 464 commands), each waiting for its table | — | 15.9 s (7.4 s of process starts) | {t:.1} s{floor} | < 10 s |");
            if let Some(t) = sc.cli_64x100_no_wait_s {
                let _ = writeln!(s, "| the same with `backend add --no-wait` (answered once recorded; each VIP's table published once per 20 ms tick; until the last is published, the same tables by fingerprint) | — | — | {t:.1} s | < 10 s |");
            }
        }
        if let Some(m) = sc.tables_mib_512 {
            let one = sc.tables_mib_1.map(|m| format!("; {m:.2} MiB with 1 VIP")).unwrap_or_default();
            let _ = writeln!(s, "| table memory, 512 VIPs with backends (`xlb status`, `XLB_TABLES`: allocated per VIP; once the removal's burst is over) | {:.1} MiB for `--max-vips 64`, preallocated | 257.0 MiB preallocated for `--max-tables 512` (even with 1 VIP) | {m:.1} MiB{one} | grows with the VIPs configured |", 66.0 * 65537.0 * 8.0 / 1048576.0);
        }
    }
    if !r.errors.is_empty() {
        let _ = writeln!(s, "\n## Sections that failed in this run\n");
        for e in &r.errors {
            let _ = writeln!(s, "- {e}");
        }
    }
    let _ = writeln!(s, "\n## Method\n");
    let _ = writeln!(
        s,
        "- Per-packet: steady cases run one frame with repeat N = 4·10⁶ and 2N; cost = (wall time of 2N − wall time of N) / N, five runs, median and spread, each run paired with the same measurement of the case's floor (order swapped every run), the ratio the median of the five per-run ratios; the kernel's own average (1 ns resolution) is shown too. The program's counters prove each run took the intended path (the proof column). New flows (main figure, `*_new_flow`): the floors object's `new_flows` program adds one to the frame's source address and tail-calls the program under test, with repeat 10⁵ (five calls, each its own address range): every run is a new 5-tuple, with caches as warm as a NIC's batches keep them; kernel average per run, median and spread. `*_new_flow_cold`: one syscall per frame over 50 000 distinct 5-tuples, the per-call overhead calibrated out with the same loop on `floor_pass`; every frame then meets caches the syscall path has disturbed (kept for comparison). `*_new_flow_64k_table`, `*_new_flow_1k_table`: the warm method with a 65 536-flow and a 1 024-flow table (whose sets stay cached: a new flow's own work), to show how much of a new flow is the table's size. `*_new_flow_alternated`: an empty and a full table side by side, timed in alternation (7 rounds, order swapped every round); full ÷ empty is the median of the per-round ratios. Connection table \"50 %\" and \"full\": filled first with 50 % or 100 % of `--conntrack-size` (1 Mi) unrelated flows, placed as the datapath places them (new flows then evict: counted in the proof column). New flows are compared with `floor_one_line` (what a one-line table cannot avoid)."
    );
    let _ = writeln!(s, "- Floors (a separate build of the same crate, same harness): `floor_pass` returns XDP_PASS; `floor_macswap_tx` swaps MACs and returns XDP_TX; `floor_stateless_dsr` parses IPv4 and the ports, hashes the 5-tuple once, reads one table entry (a MAC) and rewrites both MACs. `floor_one_line` is the stateless floor plus a read-modify-write of one random 64-byte line of a 16 MiB array, `floor_lru_insert` the stateless floor plus a lookup and an insert of the 5-tuple in a 1 Mi-entry kernel `LRU_HASH`, both behind the `new_flows` wrapper. `floor_work` is the stateless floor plus 32 rounds of ALU work (no memory), `floor_one_line_nudge` `floor_one_line` plus 4 rounds, `floor_one_line_work` `floor_one_line` plus 32 rounds: what one line costs a program that does some work; `floor_ct_insert` the stateless floor plus xlb's own connection-table lookup and insert (`lb_common::ct`, an array of the default table's size). `floor_stateless_dsr_new_flows` is the stateless floor behind the same `new_flows` wrapper (so the wrapper and tail call cancel out), `floor_stateless_dsr_new_flows_cold` the same over the cold method's frames: new 5-tuples make table reads miss caches, which a single repeated frame never does, so new flows are compared with these (and, in the proof column, with the repeated-frame floor too).");
    let _ = writeln!(s, "- Live: BPF_PROG_RUN with live frames from a generator namespace; its program gives each frame the next of the flows' source ports and sends it (XDP_TX) over a veth to the balancer's namespace, where xlb (or the reflector) sends it back to a counting sink. Offered rate: the generator transmits k of every 1024 runs (evenly spread), first at its full rate, then by bisection on k (7 steps); drop-free = highest offered rate with < 0.1 % loss. Generator, balancer and sink share this machine's CPUs.");
    let _ = writeln!(s, "- Real clients: nginx (1 worker, fixed answer) on every backend; `ab -n {} -c 16` (a new connection per request) and `iperf3 -t 4` (one TCP stream, to a VIP with one backend: its control and data connections must meet one server), 3 runs per mode, medians. `stateless` is `floor_forward` (the floors object's ~20-line stateless MAC-rewrite forwarder) attached in xlb's place: the floor xlb is compared with, since the extra hop through the balancer's namespace costs both the same. CPU from /proc/stat over each run for the whole machine; the balancer's share = that minus the direct baseline (client → one backend). nftables DNATs with a `numgen` map and routes replies back; HAProxy proxies (two connections per client connection); xlb and the stateless forwarder forward requests only (L2 DSR). CPU time is counted in 10 ms ticks, so each figure is ± about 0.5 µs per connection.", 20000);
    s
}

/// The connection-table comparison of issue 12: the figures the issue
/// measured before the set-associative table, and this run's.
fn new_flow_table(s: &mut String, r: &Results) {
    let at = |name: &str, ct: &str| {
        r.cases.iter().find(|c| c.case == name && c.backends == 3 && c.conntrack.starts_with(ct)).map(|c| format!("{:.0}", c.ns_per_pkt)).unwrap_or_else(|| "-".into())
    };
    let floor = |name: &str| r.cases.iter().find(|c| c.case == name).map(|c| format!("{:.0}", c.ns_per_pkt)).unwrap_or_else(|| "-".into());
    let _ = writeln!(s, "\n## New flows: one cache line (IPv4 TCP, 3 backends, ns per packet)\n");
    let _ = writeln!(s, "| | established | new flow, table empty | new flow, table 50 % | new flow, table full |\n|---|---:|---:|---:|---:|");
    let _ = writeln!(s, "| the C balancer (issue 12's measurement, LRU table, flood guard off) | 135 | 497 | | 829 |");
    let _ = writeln!(s, "| xlb with the kernel LRU hash (issue 12's measurement) | 77 | 469 | | 825 |");
    let _ = writeln!(s, "| stateless floor (issue 12's measurement) | 34 | 37 | | 37 |");
    let _ = writeln!(
        s,
        "| **xlb, set-associative table (this run)** | {} | {} | {} | {} |",
        at("v4_tcp_established", "empty"),
        at("v4_tcp_new_flow", "empty"),
        at("v4_tcp_new_flow", "50 %"),
        at("v4_tcp_new_flow", "full")
    );
    let _ = writeln!(
        s,
        "| stateless floor (this run: `floor_stateless_dsr`, `floor_stateless_dsr_new_flows`) | {} | {} | {} | {} |",
        floor("floor_stateless_dsr"),
        floor("floor_stateless_dsr_new_flows"),
        floor("floor_stateless_dsr_new_flows"),
        floor("floor_stateless_dsr_new_flows")
    );
    let _ = writeln!(s, "| `floor_one_line` (this run) | | {} | | |", floor("floor_one_line"));
    let _ = writeln!(s, "| `floor_one_line_ct` (this run: one line of 51 MiB, the default table's size) | | {} | | |", floor("floor_one_line_ct"));
    let _ = writeln!(s, "| `floor_lru_insert` (this run) | | {} | | |", floor("floor_lru_insert"));
    let _ = writeln!(s, "| `floor_one_line_nudge` (this run: `floor_one_line` + 4 rounds of ALU work) | | {} | | |", floor("floor_one_line_nudge"));
    let _ = writeln!(s, "| `floor_work`; `floor_one_line_work` (this run: 32 rounds of ALU work without; with the line) | | {}; {} | | |", floor("floor_work"), floor("floor_one_line_work"));
    let _ = writeln!(s, "| `floor_ct_insert` (this run: xlb's own table lookup and insert, one set of 51 MiB, no VIP lookup, scheduler or counters) | | {} | | |", floor("floor_ct_insert"));
    let _ = writeln!(s, "| xlb, table of 1 024 flows (this run: its sets stay cached, `v4_tcp_new_flow_1k_table`) | | {} | | |", at("v4_tcp_new_flow_1k_table", "capacity"));
    // What the one random line costs each program: with the line minus without.
    let ns = |name: &str, ct: Option<&str>| {
        r.cases.iter().find(|c| c.case == name && ct.is_none_or(|ct| c.backends == 3 && c.conntrack.starts_with(ct))).map(|c| c.ns_per_pkt).unwrap_or(f64::NAN)
    };
    // The median of the alternated rounds: steadier than one case's five calls.
    let new_flow = ns("v4_tcp_new_flow_alternated", Some("empty"));
    let _ = writeln!(
        s,
        "\nWhat one random line costs (with it − without it, this run): the bare floor {:.0} ns (`floor_one_line` − `floor_stateless_dsr_new_flows`); with 4 rounds of work {:.0} ns (`floor_one_line_nudge` − `floor_stateless_dsr_new_flows`); with 32 rounds {:.0} ns (`floor_one_line_work` − `floor_work`); xlb {:.0} ns (`v4_tcp_new_flow_alternated`, table empty, median of its rounds − `v4_tcp_new_flow_1k_table`). The bare floor is so short that the next packets' misses overlap its own in the repeat loop; a few ns of work end that, and from then on a line costs any program the same. xlb's new flow (the same) is {:.2} × `floor_one_line_work` and {:.2} × `floor_ct_insert` (its own table alone).",
        ns("floor_one_line", None) - ns("floor_stateless_dsr_new_flows", None),
        ns("floor_one_line_nudge", None) - ns("floor_stateless_dsr_new_flows", None),
        ns("floor_one_line_work", None) - ns("floor_work", None),
        new_flow - ns("v4_tcp_new_flow_1k_table", Some("capacity")),
        new_flow / ns("floor_one_line_work", None),
        new_flow / ns("floor_ct_insert", None),
    );
    let _ = writeln!(s, "\nThe first three rows were measured by the issue on the same harness and machine on another day; only this run's rows compare with each other.");
}

/// A bar chart of ns/packet per case (3 backends, table empty; 10 000
/// backends, table full) with the floors as lines.
pub fn plot(r: &Results, path: &Path) -> Result<()> {
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .context("the plot needs fonts-dejavu-core (cargo xtask bench installs it)")?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow!("bad font"))?;
    let names = ["nonvip_pass", "v4_tcp_established", "v4_udp", "v6_tcp_established", "icmp_ptb", "v4_tcp_new_flow", "v6_tcp_new_flow"];
    let get = |name: &str, b: u32, ct: &str| r.cases.iter().find(|c| c.case == name && c.backends == b && c.conntrack.starts_with(ct)).map(|c| c.ns_per_pkt).unwrap_or(0.0);
    let floor = |n: &str| r.cases.iter().find(|c| c.case == n).map(|c| c.ns_per_pkt).unwrap_or(0.0);
    let ymax = r.cases.iter().map(|c| c.ns_per_pkt).fold(0.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (1100, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("xlb: ns per packet (BPF_PROG_TEST_RUN), lower is better", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..names.len() as f64 - 0.5, (1f64..ymax.max(10.0)).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < names.len() { names[i as usize].to_string() } else { String::new() }
        })
        .y_desc("ns/packet (log scale)")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let series = [(3u32, "empty", BLUE.mix(0.7), "3 backends, table empty"), (10_000, "full", RED.mix(0.7), "10 000 backends, table ~1M")];
    for (k, (b, ct, color, label)) in series.iter().enumerate() {
        let bars: Vec<Rectangle<(f64, f64)>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let x0 = i as f64 - 0.4 + k as f64 * 0.4;
                Rectangle::new([(x0, 1.0), (x0 + 0.38, get(n, *b, ct).max(1.0))], color.filled())
            })
            .collect();
        let c = *color;
        chart
            .draw_series(bars)
            .map_err(|e| anyhow!("{e}"))?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    for (n, color) in [("floor_pass", GREEN), ("floor_macswap_tx", MAGENTA), ("floor_stateless_dsr", BLACK), ("floor_stateless_dsr_new_flows", CYAN)] {
        let y = floor(n);
        chart
            .draw_series(LineSeries::new(vec![(-0.5, y), (names.len() as f64 - 0.5, y)], color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(format!("{n} ({y:.1} ns)"))
            .legend(move |(x, y2)| PathElement::new(vec![(x, y2), (x + 14, y2)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
