//! Network namespaces and veth pairs with cleanup guards.
use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

/// A name no other test in any process uses right now: `<prefix><pid36>x<n36>`, at most 15
/// bytes so it also fits an interface name. `n` counts the calls in this process, in base 36
/// too: a test binary holding many modules makes a few hundred names, two digits.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{}", radix36(std::process::id()), radix36(n));
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

fn radix36(mut v: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Runs `ip` with `args`, failing with stderr when it fails.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    sh("ip", args)
}

/// Runs a program, failing with its stderr when it exits non-zero.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("running {program} (is it installed? `cargo xtask setup` installs it)")
    })?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace, deleted on drop (with every interface in it).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `unique_name(prefix)` with `lo` up.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let name = unique_name(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs a command inside the namespace and fails if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// A `Command` that runs the `lb` binary inside the namespace.
    pub fn lb(&self) -> anyhow::Result<Command> {
        let lb = crate::proc::lb_binary()?;
        Ok(self.command(lb.to_str().context("non-UTF-8 path to lb")?))
    }

    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> anyhow::Result<[u8; 6]> {
        // /sys shows the caller's namespace: ask `ip` about this one instead.
        let out = Command::new("ip")
            .args(["-n", &self.name, "-br", "link", "show", dev])
            .output()
            .context("running ip")?;
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let mac = line
            .split_whitespace()
            .nth(2)
            .with_context(|| format!("no MAC for {dev} in {}: {line:?}", self.name))?;
        let mut bytes = [0u8; 6];
        for (i, p) in mac.split(':').enumerate().take(6) {
            bytes[i] = u8::from_str_radix(p, 16).with_context(|| format!("MAC {mac:?}"))?;
        }
        Ok(bytes)
    }

    /// Every interface of this namespace but `lo`, bridges last (a bridge's MTU follows its
    /// ports').
    pub fn links(&self) -> anyhow::Result<Vec<String>> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "-d", "link", "show"])
            .output()
            .context("running ip")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut links: Vec<(bool, String)> = text
            .lines()
            .filter_map(|l| {
                let name = l.split(": ").nth(1)?.split('@').next()?.to_string();
                (name != "lo").then(|| (l.contains(" bridge "), name))
            })
            .collect();
        links.sort();
        Ok(links.into_iter().map(|(_, n)| n).collect())
    }

    /// Sets the MTU of every interface of this namespace but `lo`.
    pub fn set_mtu_all(&self, mtu: u32) -> anyhow::Result<()> {
        let mtu = mtu.to_string();
        for dev in self.links()? {
            self.ip(&["link", "set", &dev, "mtu", &mtu])?;
        }
        Ok(())
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
    }

    /// Spawns a thread that enters this namespace and runs `f` (sockets made in `f` live in
    /// the namespace).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns on this new thread only; the fd is a valid netns file.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        }))
    }

    /// Runs `f` on a thread that has entered this namespace, so std sockets made in `f` live in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd as _;
                // SAFETY: setns on this thread only; the fd is a valid netns file.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    bail!("setns into {path}: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// A veth pair with one end in each of two namespaces. Deleting either namespace removes both
/// ends; the guard deletes the link explicitly too, in case the namespaces outlive it.
#[derive(Debug)]
pub struct VethPair {
    pub a: String,
    pub b: String,
    ns_a: String,
}

impl VethPair {
    /// Creates `a` in `ns_a` and `b` in `ns_b`, both up, with the given CIDR addresses.
    pub fn new(ns_a: &Netns, addr_a: &str, ns_b: &Netns, addr_b: &str) -> anyhow::Result<Self> {
        let a = unique_name("va");
        let b = unique_name("vb");
        ip(&[
            "link",
            "add",
            &a,
            "netns",
            ns_a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            ns_b.name(),
        ])?;
        let pair = VethPair {
            a,
            b,
            ns_a: ns_a.name().to_string(),
        };
        ns_a.ip(&["addr", "add", addr_a, "dev", &pair.a])?;
        ns_b.ip(&["addr", "add", addr_b, "dev", &pair.b])?;
        ns_a.ip(&["link", "set", &pair.a, "up"])?;
        ns_b.ip(&["link", "set", &pair.b, "up"])?;
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Best effort: gone already if its namespace was deleted first.
        let _ = ip(&["-n", &self.ns_a, "link", "del", &self.a]);
    }
}

/// Two namespaces, a load balancer (`lb`, 10.N.0.1) and a backend (`backend`, 10.N.0.2), joined
/// by a veth: the smallest network an agent can run on. Removed on drop.
pub struct TwoHosts {
    pub lb: Netns,
    pub backend: Netns,
    pub veth: VethPair,
}

impl TwoHosts {
    /// Namespaces named after `tag`, addresses in 10.`subnet`.0.0/24.
    pub fn new(tag: &str, subnet: u8) -> anyhow::Result<Self> {
        let lb = Netns::new(&format!("{tag}l"))?;
        let backend = Netns::new(&format!("{tag}b"))?;
        let veth = VethPair::new(
            &lb,
            &format!("10.{subnet}.0.1/24"),
            &backend,
            &format!("10.{subnet}.0.2/24"),
        )?;
        Ok(TwoHosts { lb, backend, veth })
    }
}
