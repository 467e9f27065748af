//! The container packaging: the Dockerfile passes hadolint, and an image of the `lb` binary
//! (built here `FROM scratch` with the binary and the libraries it links: no registry is
//! reachable to pull the Dockerfile's base images) runs `lb --version`, and `lb run` with host
//! networking inside a test namespace, with only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON and
//! the shipped seccomp profile (an allowlist: any other system call fails with ENOSYS): it
//! attaches, takes changes, probes its backends, serves real traffic, `/metrics` and the
//! status page, and detaches on stop. A call the agent needs and the profile lacks breaks one
//! of these steps.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::Context as _;
use lb_tests::{
    ChildGuard, lb_binary,
    topo::{self, DemoNet, PORT, VIP, get, http_request},
    unique_name,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

#[test]
fn the_dockerfile_passes_hadolint() -> anyhow::Result<()> {
    let out = Command::new("hadolint")
        .arg(repo().join("packaging/container/Dockerfile"))
        .output()
        .context("running hadolint (installed by `cargo xtask setup`)")?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Podman with its own storage under a temporary directory (vfs: no overlay mounts), every
/// container and the directory removed on drop.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("podman"));
        std::fs::create_dir_all(&dir)?;
        Ok(Podman { dir })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"]);
        cmd
    }

    fn ok(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = self.command().args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// `podman run` options this host needs (see ../shared/NETNS-NOTES.md).
    fn run_args() -> [&'static str; 7] {
        [
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit=nproc=1024:1024",
        ]
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.command().args(["rm", "--all", "--force"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The libraries `binary` loads, as `ldd` resolves them (absolute paths).
fn libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

/// Builds `xdp-lb:test` from scratch: the binary and its libraries at their own paths.
fn build_image(podman: &Podman) -> anyhow::Result<()> {
    let ctx = podman.dir.join("context");
    let lb = lb_binary()?;
    let mut files = libraries(&lb)?;
    files.push(lb.clone());
    for f in &files {
        let to = ctx.join("rootfs").join(f.strip_prefix("/")?);
        std::fs::create_dir_all(to.parent().context("parent")?)?;
        // Follow symlinks: the image gets the real file under the name the loader asks for.
        std::fs::copy(f, &to).with_context(|| format!("copying {}", f.display()))?;
    }
    std::fs::write(
        ctx.join("Containerfile"),
        format!(
            "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"{}\"]\n",
            lb.display()
        ),
    )?;
    podman.ok(&[
        "build",
        "--quiet",
        "--tag",
        "xdp-lb:test",
        &ctx.to_string_lossy(),
    ])?;
    Ok(())
}

/// Stops the container `name` on drop (the podman client being killed leaves it running).
struct Running<'a> {
    podman: &'a Podman,
    name: String,
    client: Option<ChildGuard>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .command()
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
        self.client = None;
    }
}

fn xdp_attached(net: &DemoNet) -> anyhow::Result<bool> {
    let out = Command::new("ip")
        .args(["-n", net.lb.name(), "link", "show", "eth0"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("xdp"))
}

#[test]
fn a_scratch_image_runs_the_agent_with_three_capabilities() -> anyhow::Result<()> {
    let podman = Podman::new()?;
    build_image(&podman)?;
    let out = podman.ok(&[&Podman::run_args()[..], &["xdp-lb:test", "--version"]].concat())?;
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(version.contains("map ABI"), "{version}");

    let mut net = DemoNet::build(2, "generic")?;
    net.start_backends()?;
    let name = unique_name("lbc");
    let seccomp = format!(
        "seccomp={}",
        repo().join("packaging/container/seccomp.json").display()
    );
    // Only the agent's own directory of the bpffs, as the README and the DaemonSet mount it.
    let own = net.dir.bpffs.join("xdp-lb");
    std::fs::create_dir_all(&own)?;
    let bpffs = format!("{}:/sys/fs/bpf", own.display());
    let run_dir = format!("{}:/run/xdp-lb", net.dir.dir.display());
    // Host networking inside the test's load-balancer namespace: nsenter changes only the
    // network namespace (`ip netns exec` would also remount /sys, hiding the cgroups runc
    // needs).
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", net.lb.name()));
    cmd.arg("podman");
    cmd.args(podman.command().get_args());
    cmd.args(Podman::run_args());
    cmd.args([
        "--name",
        &name,
        "--network",
        "host",
        "--security-opt",
        &seccomp,
    ]);
    cmd.args([
        "--cap-drop",
        "all",
        "--cap-add",
        "CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON",
    ]);
    cmd.args(["-v", &bpffs, "-v", &run_dir]);
    cmd.args(["xdp-lb:test", "run", "--iface", "eth0", "--mode", "generic"]);
    cmd.args(["--state-file", "/run/xdp-lb/state.json"]);
    cmd.args(["--metrics", "127.0.0.1:9464"]);
    let mut client = ChildGuard::spawn(cmd, "podman run lb")?;
    client.wait_for_line(Duration::from_secs(30), |l| {
        l.starts_with("serving the control API")
    })?;
    let running = Running {
        podman: &podman,
        name: name.clone(),
        client: Some(client),
    };
    assert!(xdp_attached(&net)?, "not attached");
    // The CLI on the host drives the agent in the container through the shared socket.
    let health = [
        "--health",
        "http",
        "--interval-ms",
        "200",
        "--timeout-ms",
        "150",
    ];
    net.add_vip(&format!("{VIP}:{PORT}/tcp"), &[0, 1], &health)?;
    let vip = VIP.parse()?;
    let mut seen = [0usize; 2];
    for _ in 0..20 {
        seen[net.http_get(vip, PORT)?] += 1;
    }
    assert!(seen.iter().all(|n| *n > 0), "{seen:?}");
    // The health probes (TCP and HTTP from inside the container) pass for both backends.
    lb_tests::wait_until(
        Duration::from_secs(5),
        "both backends probed up",
        || {
            let v = net.dir.vips()?;
            Ok(v[0].backends.iter().all(|b| b.last_check == "ok"))
        },
        || format!("{:?}", net.dir.vips()),
    )?;
    // The metrics listener and the status page.
    let metrics_at = "127.0.0.1:9464".parse()?;
    for (path, want) in [
        ("/metrics", "lb_backend_up{"),
        ("/status.json", "\"events\""),
        ("/readyz", "ready"),
    ] {
        let answer = http_request(&net.lb, metrics_at, &get(path))?;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains(want),
            "{path}: {answer}"
        );
    }
    net.lb(&[
        "backend",
        "drain",
        &format!("{VIP}:{PORT}/tcp"),
        &topo::backend_ip(1),
    ])?;
    net.lb(&["stats"])?;
    // `podman stop` sends SIGTERM: the agent detaches (no --keep-on-exit) and exits 0.
    podman.ok(&["stop", "--time", "10", &name])?;
    assert!(!xdp_attached(&net)?, "still attached after podman stop");
    drop(running);
    Ok(())
}
