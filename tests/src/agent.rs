//! Running the real `lb` agent in a namespace for tests and the demo: a private directory for
//! its socket and state file, a private bpffs mount for its pins (visible to every `ip netns
//! exec` that starts later, so a restarted agent finds them), all removed on drop.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb_userspace::api::protocol::{BackendView, StatsView, VipView};

use crate::{ChildGuard, Netns, lb_binary, net::sh, unique_name};

/// A private directory with its own bpffs mount.
pub struct AgentDir {
    pub dir: PathBuf,
    pub bpffs: PathBuf,
}

impl AgentDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name(prefix));
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs).with_context(|| format!("creating {}", bpffs.display()))?;
        let guard = AgentDir { dir, bpffs };
        sh("mount", &["-t", "bpf", "bpf", path_str(&guard.bpffs)?])?;
        Ok(guard)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("lb.sock")
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Runs `lb --socket <ours> args...` (from the root namespace: the socket is a file).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(lb_binary()?)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .context("running lb")
    }

    /// As [`AgentDir::cli`], failing with lb's stderr when it fails; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "`lb {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Where the agent on `iface` pins map `name` under this bpffs.
    pub fn map_pin(&self, iface: &str, name: &str) -> PathBuf {
        lb_userspace::dataplane::pins::pin_dir(&self.bpffs, iface)
            .join("maps")
            .join(name)
    }

    /// `lb vip list --json`, read into the API's own types.
    pub fn vips(&self) -> anyhow::Result<Vec<VipView>> {
        let out = self.cli_ok(&["vip", "list", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("reading `lb vip list --json`: {out}"))
    }

    /// Backend `addr` of the first VIP, if it has one.
    pub fn backend(&self, addr: &str) -> anyhow::Result<Option<BackendView>> {
        let addr: std::net::IpAddr = addr.parse().context("backend address")?;
        Ok(self
            .vips()?
            .into_iter()
            .next()
            .and_then(|v| v.backends.into_iter().find(|b| b.address == addr.into())))
    }

    /// Health of backend `addr` in the first VIP (`up`, `down`, `unchecked`; empty if absent).
    pub fn backend_health(&self, addr: &str) -> anyhow::Result<String> {
        Ok(self.backend(addr)?.map(|b| b.health).unwrap_or_default())
    }

    /// `lb stats --json`, read into the API's own types.
    pub fn stats(&self) -> anyhow::Result<StatsView> {
        let out = self.cli_ok(&["stats", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("reading `lb stats --json`: {out}"))
    }

    /// Starts `lb run` on `iface` inside `ns` and waits until its API is up.
    pub fn spawn_agent(
        &self,
        ns: &Netns,
        iface: &str,
        extra: &[&str],
    ) -> anyhow::Result<ChildGuard> {
        self.spawn_agent_as(ns, iface, extra, &[])
    }

    /// As [`AgentDir::spawn_agent`], run through `wrapper` (e.g. `setpriv` with a user and
    /// capability set), which must exec the command it is given.
    pub fn spawn_agent_as(
        &self,
        ns: &Netns,
        iface: &str,
        extra: &[&str],
        wrapper: &[String],
    ) -> anyhow::Result<ChildGuard> {
        self.spawn_binary(&lb_binary()?, ns, iface, extra, wrapper)
    }

    /// As [`AgentDir::spawn_agent_as`], running the `lb` at `lb` (another build's, such as
    /// the previous release in the upgrade test).
    pub fn spawn_binary(
        &self,
        lb: &Path,
        ns: &Netns,
        iface: &str,
        extra: &[&str],
        wrapper: &[String],
    ) -> anyhow::Result<ChildGuard> {
        let lb = lb.to_path_buf();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = ns.command(first);
                c.args(rest).arg(&lb);
                c
            }
            None => ns.command(path_str(&lb)?),
        };
        cmd.arg("--socket")
            .arg(self.socket())
            .args(["run", "--iface", iface]);
        cmd.arg("--state-file").arg(self.state_file());
        cmd.arg("--bpffs").arg(&self.bpffs);
        cmd.args(extra);
        let mut child = ChildGuard::spawn(cmd, "lb run")?;
        child.wait_for_line(Duration::from_secs(30), |l| {
            l.starts_with("serving the control API")
        })?;
        Ok(child)
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

impl Drop for AgentDir {
    fn drop(&mut self) {
        // Lazy unmount: pins vanish with the mount once nothing holds them.
        let _ = sh("umount", &["-l", &self.bpffs.to_string_lossy()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
