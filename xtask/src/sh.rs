//! Running commands with errors that say what failed.

use anyhow::{bail, Context, Result};
use std::process::Command;

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a command with inherited output; fail when it fails.
pub fn run(c: &mut Command) -> Result<()> {
    let what = describe(c);
    let status = c.status().with_context(|| format!("cannot run `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Run a command and return its standard output.
pub fn capture(c: &mut Command) -> Result<String> {
    let what = describe(c);
    let out = c.output().with_context(|| format!("cannot run `{what}`"))?;
    if !out.status.success() {
        bail!("`{what}` failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
