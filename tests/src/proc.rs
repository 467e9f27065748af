//! Child processes that are killed and reaped on drop.
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// Path of the `lb` binary built next to the running test (`target/<profile>/lb`), or `$LB_BIN`.
pub fn lb_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the test binary")?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let cand = dir.join("lb");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "the `lb` binary is not built next to {}: run `cargo xtask test`",
        exe.display()
    )
}

/// A spawned child whose stdout lines arrive on a channel; killed (SIGKILL) and reaped on drop.
pub struct ChildGuard {
    child: Child,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout piped (stderr inherited so failures show in test output).
    pub fn spawn(mut cmd: Command, what: &str) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        let stdout: ChildStdout = child.stdout.take().context("child stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ChildGuard {
            child,
            lines,
            what: what.to_string(),
        })
    }

    /// Waits up to `timeout` for a stdout line satisfying `pred`; returns it.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return Ok(line),
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{}: no expected output within {timeout:?}", self.what)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!(
                        "{} exited before the expected output ({status:?})",
                        self.what
                    )
                }
            }
        }
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL now, and reap (what `kill -9` does to a daemon).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns all remaining stdout lines.
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let pid = self.child.id().to_string();
        crate::net::sh("kill", &["-TERM", &pid])?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status}", self.what);
                }
                break;
            }
            if std::time::Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            rest.push(line);
        }
        Ok(rest)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `lb samples` (one HTTP + UDP echo backend on `port`, both families) in `ns`,
/// answering "hello from backend `index`"; returns once it listens.
pub fn sample_backend(ns: &crate::Netns, port: u16, index: usize) -> anyhow::Result<ChildGuard> {
    let mut cmd = ns.lb()?;
    cmd.args(["samples", "--count", "1", "--base-port", &port.to_string()]);
    cmd.args(["--bind", "::", "--first-index", &index.to_string()]);
    cmd.args(["--duration", "1800"]);
    let mut child = ChildGuard::spawn(cmd, &format!("sample backend {index}"))?;
    child.wait_for_line(Duration::from_secs(10), |l| l.contains("listening"))?;
    Ok(child)
}

/// Attaches the XDP_PASS program to `dev` in `ns` (native XDP_TX and redirects into a veth
/// are delivered only when its peer runs XDP); detached when the guard drops.
pub fn xdp_pass(ns: &crate::Netns, dev: &str) -> anyhow::Result<ChildGuard> {
    let mut cmd = ns.lb()?;
    cmd.args(["xdp-pass", "--iface", dev]);
    let mut child = ChildGuard::spawn(cmd, &format!("xdp-pass on {dev}"))?;
    // It loads (and the kernel verifies) the whole object first: seconds on a loaded machine.
    child.wait_for_line(Duration::from_secs(30), |l| l.contains("XDP_PASS attached"))?;
    Ok(child)
}
