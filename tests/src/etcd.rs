//! A real etcd for fleet tests, inside a namespace the test created, with its own data dir
//! (removed on drop). It can be stopped (SIGKILL) and started again on the same data.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{ChildGuard, Netns, unique_name};

/// The client port (the namespace is the test's own, so a fixed port cannot clash).
pub const PORT: u16 = 2379;

pub struct Etcd {
    ns: String,
    dir: PathBuf,
    /// Address the nodes reach it on (one of the namespace's addresses).
    pub addr: String,
    child: Option<ChildGuard>,
}

impl Etcd {
    /// Starts etcd in `ns`, listening on every address of it; `addr` is the one waited on.
    pub fn start(ns: &Netns, addr: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("etcd"));
        std::fs::create_dir_all(&dir)?;
        let mut e = Etcd {
            ns: ns.name().to_string(),
            dir,
            addr: addr.to_string(),
            child: None,
        };
        e.resume()?;
        Ok(e)
    }

    /// `etcd://ADDR:PORT` for `lb run --store`.
    pub fn url(&self) -> String {
        format!("etcd://{}:{PORT}", self.addr)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    /// Starts (again) on the same data dir and waits until it answers.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let mut cmd = self.command("etcd");
        cmd.args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &format!("http://0.0.0.0:{PORT}"),
                "--advertise-client-urls",
                &format!("http://{}:{PORT}", self.addr),
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "t=http://127.0.0.1:2380",
            ])
            .stderr(Stdio::from(log));
        self.child = Some(ChildGuard::spawn(cmd, "etcd")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.ctl(&["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "etcd did not become healthy within 20 s; its log: {}",
            std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
        )
    }

    /// What etcd logged (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// SIGKILL (the store disappears at once, as a crashed or partitioned etcd does).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// `etcdctl ARGS` against it; stdout.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &format!("http://{}:{PORT}", self.addr),
                "--dial-timeout",
                "1s",
                "--command-timeout",
                "2s",
            ])
            .args(args)
            .output()
            .context("running etcdctl")?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
