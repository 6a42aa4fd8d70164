//! End to end, issue 4 (declarative config): `xlb config dump` reproduces the
//! running state; a reload with a broken file changes nothing and names the
//! line; SIGHUP applies exactly the difference. Needs root.

use std::time::Duration;
use xlb_tests::{
    lab::{backend_ip, VIP},
    scenario::{binaries, vip_arg, Deployment},
};

fn config(b1_weight: u32, with_b3: bool, extra_vip: bool) -> String {
    let mut t = format!(
        "[[vip]]\naddress = \"{}\"\nall_down = \"fail-open\"\n\n[[vip.backend]]\nip = \"{}\"\nweight = {b1_weight}\n\n[[vip.backend]]\nip = \"{}\"\nstate = \"drain\"\n",
        vip_arg(),
        backend_ip(1),
        backend_ip(2)
    );
    if with_b3 {
        t.push_str(&format!("\n[[vip.backend]]\nip = \"{}\"\n", backend_ip(3)));
    }
    if extra_vip {
        t.push_str(&format!("\n[[vip]]\naddress = \"{VIP}:5353/udp\"\nalgo = \"rr\"\n\n[[vip.backend]]\nip = \"{}\"\n", backend_ip(1)));
    }
    t
}

/// (vip, ip, weight, state) of every backend.
fn shape(d: &Deployment) -> Vec<(String, String, u64, String)> {
    let st = d.status().expect("status");
    let mut out = Vec::new();
    for v in st["vips"].as_array().into_iter().flatten() {
        for b in v["backends"].as_array().into_iter().flatten() {
            out.push((
                v["vip"].as_str().unwrap_or("").to_string(),
                b["ip"].as_str().unwrap_or("").to_string(),
                b["weight"].as_u64().unwrap_or(0),
                b["state"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

#[test]
fn dump_reload_and_sighup() {
    let (xlb, lab_bin) = binaries();
    let dir = xlb_tests::lab::TempDir::new("config").expect("scratch dir");
    let file = dir.join("xlb.toml");
    std::fs::write(&file, config(1, true, false)).expect("config");
    let path = file.to_string_lossy().into_owned();
    let d = Deployment::start(&xlb, &lab_bin, 3, &["--config", &path]).expect("deployment");
    d.wait("all three backends up or draining", Duration::from_secs(10), || {
        Ok(shape(&d).iter().filter(|b| b.3 == "up" || b.3 == "drain").count() == 3)
    })
    .expect("up");
    let before = shape(&d);
    assert_eq!(before[1].3, "drain", "state from the file");

    // The dump reproduces the running state: applying it changes nothing.
    let dump = d.cli_ok(&["config", "dump"]).expect("dump");
    assert!(dump.contains("state = \"drain\"") && dump.contains("all_down = \"fail-open\""), "{dump}");
    std::fs::write(dir.join("dump.toml"), &dump).expect("write dump");
    let out = d.cli_ok(&["config", "reload", "--file", &dir.join("dump.toml").to_string_lossy()]).expect("reload dump");
    assert_eq!(out.trim(), "config: no change", "{out}");

    // A broken file (a bad MAC) changes nothing and names the line.
    let broken = config(5, false, true).replacen(&format!("ip = \"{}\"\n", backend_ip(2)), &format!("ip = \"{}\"\nmac = \"zz\"\n", backend_ip(2)), 1);
    let line = broken.lines().position(|l| l == "mac = \"zz\"").expect("the bad line") + 1;
    std::fs::write(&file, &broken).expect("broken");
    let out = d.cli(&["config", "reload"]).expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("line {line}:")) && err.contains("invalid MAC"), "{err}");
    assert_eq!(shape(&d), before, "nothing changed");

    // A good file through SIGHUP: exactly the difference.
    std::fs::write(&file, config(3, false, true)).expect("good");
    let pid = d.lab.pid("agent").expect("agent pid");
    std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().expect("kill -HUP");
    d.wait("the reload", Duration::from_secs(5), || Ok(shape(&d).len() == 3 && shape(&d).iter().any(|b| b.0.ends_with("/udp"))))
        .expect("reloaded");
    let after = shape(&d);
    let b1 = after.iter().find(|b| b.0 == vip_arg() && b.1 == backend_ip(1).to_string()).expect("b1");
    assert_eq!(b1.2, 3, "b1 reweighted");
    assert!(!after.iter().any(|b| b.1 == backend_ip(3).to_string()), "b3 removed");
    let b2 = after.iter().find(|b| b.1 == backend_ip(2).to_string()).expect("b2");
    assert_eq!((b2.2, b2.3.as_str()), (1, "drain"), "b2 untouched");
    assert!(d.lab.log("agent").contains("SIGHUP: config reloaded"));
}
