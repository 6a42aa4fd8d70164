//! `cargo xtask bench profile`.

use super::*;

/// `cargo xtask bench profile`: where a packet's time goes. Each case runs
/// in a loop for a few seconds under `perf record -p` (this
/// process; kernel symbols: the JITed program, the helpers it calls and their return
/// thunks); the top symbols are printed. A development aid: the figures of
/// record are the cost section's.
pub fn profile(fl: &mut Floors, out: &std::path::Path) -> Result<()> {
    const SECS: u64 = 6;
    let cases: [(&str, bool, bool); 3] = [("v4_tcp_new_flow", false, true), ("v6_tcp_new_flow", true, true), ("v4_tcp_established", false, false)];
    for (name, v6, new) in cases {
        let mut a = agent(if v6 { "[fd00::100]:80/tcp" } else { "10.0.0.100:80/tcp" }, 3)?;
        let fd = a.dp.program(PROG_XLB)?.fd()?.try_clone()?;
        // For `bpftool prog dump jited id N` (perf's offsets are into it).
        if let Ok(info) = a.dp.program(PROG_XLB)?.info() {
            eprintln!("bench: profiling {name}: program id {}", info.id());
            std::thread::sleep(Duration::from_secs(3));
        }
        let data = out.join(format!("perf-{name}.data"));
        let mut perf = std::process::Command::new("perf")
            .args(["record", "-q", "-p", &std::process::id().to_string(), "-o"])
            .arg(&data)
            .args(["--", "sleep", &SECS.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot run perf (apt-get install linux-perf)")?;
        let t = Instant::now();
        let mut run = 0u8;
        let mut per = Vec::new();
        while t.elapsed() < Duration::from_secs(SECS) {
            if new {
                fl.next.set(0, &fd, 0).context("FLOOR_NEXT")?;
                per.push(timed(fl.prog("new_flows")?, &warm_frame(v6, run % 32), 20_000)?.1);
                run = run.wrapping_add(1);
            } else {
                let prog: &Xdp = a.dp.program(PROG_XLB)?;
                per.push(timed(prog, &if v6 { v6_tcp(40000, ACK) } else { v4_tcp(40000, ACK) }, 1_000_000)?.1);
            }
        }
        perf.wait()?;
        let rep = std::process::Command::new("perf")
            .args(["report", "--stdio", "-q", "--no-children", "--sort", "sym", "--percent-limit", "0.7", "-i"])
            .arg(&data)
            .output()
            .context("perf report")?;
        eprintln!("bench: profile of {name} (kernel average {:.1} ns, median of {} calls):\n{}", median(&mut per), per.len(), String::from_utf8_lossy(&rep.stdout));
    }
    Ok(())
}
