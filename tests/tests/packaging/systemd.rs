//! The systemd unit (`packaging/systemd/xdp-lb.service`): `systemd-analyze verify` passes on
//! it, its exposure stays low, and the agent runs under exactly the user-less capability set
//! the unit gives it: it attaches, serves, keeps forwarding across a restart, and detaches.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context as _;
use lb_tests::{
    lb_binary,
    net::sh,
    topo::{DemoNet, PORT, VIP},
    unique_name,
};

/// The unprivileged uid/gid the test runs the agent as (the unit's `User=xdp-lb` is a
/// system user that the test machine does not have; any non-root uid proves the point).
const NOBODY: &str = "65534";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn unit() -> anyhow::Result<String> {
    let path = repo().join("packaging/systemd/xdp-lb.service");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The value of `key=` in the unit (last one wins, as in systemd).
fn directive(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
}

/// A directory tree removed on drop.
struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

#[test]
fn the_unit_verifies_and_its_exposure_is_low() -> anyhow::Result<()> {
    // An offline root holding what the unit refers to: systemd's own units, the binaries it
    // runs, and the unit itself where an operator installs it.
    let root = Tree(std::env::temp_dir().join(unique_name("sdroot")));
    sh(
        "mkdir",
        &["-p", &root.0.join("usr/lib/systemd").to_string_lossy()],
    )?;
    sh(
        "cp",
        &[
            "-r",
            "/usr/lib/systemd/system",
            &root.0.join("usr/lib/systemd/").to_string_lossy(),
        ],
    )?;
    copy(&lb_binary()?, &root.0.join("usr/local/bin/lb"))?;
    copy(
        Path::new("/usr/bin/install"),
        &root.0.join("usr/bin/install"),
    )?;
    let installed = root.0.join("etc/systemd/system/xdp-lb.service");
    copy(&repo().join("packaging/systemd/xdp-lb.service"), &installed)?;
    let root_arg = format!("--root={}", root.0.display());
    let out = Command::new("systemd-analyze")
        .args(["verify", &root_arg, "/etc/systemd/system/xdp-lb.service"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
    // `systemd-analyze security` scores 0 (locked down) to 10; fail above 4.0 ("OK").
    let out = Command::new("systemd-analyze")
        .args([
            "security",
            "--offline=yes",
            &root_arg,
            "--threshold=40",
            "/etc/systemd/system/xdp-lb.service",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let level = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_string();
    eprintln!("{level}");
    assert!(out.status.success(), "{text}");
    Ok(())
}

/// `setpriv` arguments for the unit's `User=` (as nobody), `CapabilityBoundingSet=`,
/// `AmbientCapabilities=` and `NoNewPrivileges=`.
fn as_the_unit(unit: &str) -> anyhow::Result<Vec<String>> {
    let caps = |key: &str| -> anyhow::Result<String> {
        let v = directive(unit, key).with_context(|| format!("the unit has no {key}="))?;
        Ok(v.split_whitespace()
            .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect())
    };
    let bounding = caps("CapabilityBoundingSet")?;
    let ambient = caps("AmbientCapabilities")?;
    anyhow::ensure!(
        directive(unit, "User").is_some_and(|u| u != "root"),
        "the unit runs as root"
    );
    let mut args = vec![
        "setpriv".to_string(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".to_string(),
        format!("--inh-caps=-all{ambient}"),
        format!("--ambient-caps=-all{ambient}"),
        format!("--bounding-set=-all{bounding}"),
    ];
    if directive(unit, "NoNewPrivileges").as_deref() == Some("yes") {
        args.push("--no-new-privs".to_string());
    }
    Ok(args)
}

fn uid_of(pid: u32) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_string())
}

fn xdp_attached(net: &DemoNet) -> anyhow::Result<bool> {
    let out = Command::new("ip")
        .args(["-n", net.lb.name(), "link", "show", "eth0"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("xdp"))
}

fn answers(net: &DemoNet, n: usize) -> anyhow::Result<[usize; 2]> {
    let vip = VIP.parse()?;
    let mut seen = [0usize; 2];
    for _ in 0..n {
        seen[net.http_get(vip, PORT)?] += 1;
    }
    Ok(seen)
}

#[test]
fn the_agent_runs_with_the_units_capabilities_and_no_root_uid() -> anyhow::Result<()> {
    let unit = unit()?;
    let wrapper = as_the_unit(&unit)?;
    // The unit and the agent agree on what is needed.
    let named: Vec<String> = lb_userspace::dataplane::CAPABILITIES
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(
        directive(&unit, "CapabilityBoundingSet"),
        Some(named.join(" "))
    );
    let mut net = DemoNet::build(2, "generic")?;
    net.start_backends()?;
    // What systemd prepares: the state and socket directory owned by the service user, and
    // its own bpffs directory (the unit's ExecStartPre).
    sh(
        "chown",
        &[
            &format!("{NOBODY}:{NOBODY}"),
            &net.dir.dir.to_string_lossy(),
        ],
    )?;
    sh(
        "install",
        &[
            "-d",
            "-o",
            NOBODY,
            "-g",
            NOBODY,
            "-m",
            "0700",
            &net.dir.bpffs.join("xdp-lb").to_string_lossy(),
        ],
    )?;
    let opts = ["--mode", "generic", "--keep-on-exit"];
    let agent = net.dir.spawn_agent_as(&net.lb, "eth0", &opts, &wrapper)?;
    assert_eq!(uid_of(agent.id())?, NOBODY, "the agent runs as root");
    assert!(xdp_attached(&net)?, "not attached");
    net.add_vip(&format!("{VIP}:{PORT}/tcp"), &[0, 1], &[])?;
    let seen = answers(&net, 20)?;
    assert!(seen.iter().all(|n| *n > 0), "{seen:?}");
    // A restart (systemctl restart): forwarding goes on while no agent runs, and the next
    // one adopts the pins, still without root.
    agent.terminate(Duration::from_secs(5))?;
    assert!(xdp_attached(&net)?, "detached on a --keep-on-exit stop");
    let seen = answers(&net, 10)?;
    assert_eq!(seen.iter().sum::<usize>(), 10);
    let agent = net.dir.spawn_agent_as(&net.lb, "eth0", &opts, &wrapper)?;
    let seen = answers(&net, 20)?;
    assert!(seen.iter().all(|n| *n > 0), "{seen:?}");
    // A detach while it runs is refused; after it stops, `lb detach` (same user and
    // capabilities) removes the program.
    let bpffs = net.dir.bpffs.to_string_lossy().to_string();
    let detach = |w: &[String]| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(&w[0])
            .args(&w[1..])
            .arg(lb_binary()?)
            .args(["detach", "--iface", "eth0", "--bpffs", &bpffs])
            .output()?)
    };
    let refused = detach(&wrapper)?;
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    assert!(xdp_attached(&net)?);
    agent.terminate(Duration::from_secs(5))?;
    let out = detach(&wrapper)?;
    assert!(out.status.success(), "{out:?}");
    assert!(!xdp_attached(&net)?, "still attached after lb detach");
    Ok(())
}
