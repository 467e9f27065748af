//! The agent and its CLI against the real kernel: CRUD, one-line errors that change nothing,
//! persistence across kill -9 with the program still attached, health checks, apply plans and
//! metrics. Each test builds its own namespaces, bpffs and socket and removes them.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use lb_tests::{AgentDir, ChildGuard, Netns, TwoHosts, lb_binary, wait_until};
use lb_userspace::agent::reconcile::Serving;

/// Runs `lb args`, expects failure with one line on stderr containing `want`.
fn expect_error(dir: &AgentDir, args: &[&str], want: &str) -> anyhow::Result<()> {
    let out = dir.cli(args)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`lb {}` succeeded", args.join(" "));
    assert!(
        err.contains(want),
        "`lb {}`: stderr {err:?} lacks {want:?}",
        args.join(" ")
    );
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.contains(want) || first.starts_with("error:"),
        "not a one-line error: {err:?}"
    );
    Ok(())
}

#[test]
fn operations_and_errors_that_change_nothing() -> anyhow::Result<()> {
    let n = TwoHosts::new("op", 61)?;
    let dir = AgentDir::new("op")?;
    let _agent = dir.spawn_agent(&n.lb, &n.veth.a, &[])?;
    let vip = "10.61.0.100:80/tcp";
    dir.cli_ok(&["vip", "add", vip])?;
    // MAC given, and MAC resolved from the neighbour table (the backend namespace answers ARP).
    dir.cli_ok(&[
        "backend",
        "add",
        vip,
        "10.61.0.9",
        "--mac",
        "02:00:00:00:00:09",
        "--weight",
        "100",
    ])?;
    dir.cli_ok(&["backend", "add", vip, "10.61.0.2", "--weight", "300"])?;
    let listed = dir.cli_ok(&["backend", "list", vip])?;
    assert!(
        listed.contains("10.61.0.2") && listed.contains("75.0%"),
        "{listed}"
    );
    let before = dir.vips()?;
    let state_before = std::fs::read_to_string(dir.state_file())?;

    expect_error(&dir, &["vip", "add", vip], "already exists")?;
    expect_error(
        &dir,
        &["vip", "add", "10.61.0.101:53/udp", "--udp-idle", "0"],
        "udp_idle must be 1 to 86400 seconds",
    )?;
    expect_error(
        &dir,
        &["backend", "add", vip, "10.61.0.2"],
        "already exists",
    )?;
    expect_error(
        &dir,
        &["backend", "add", vip, "10.61.0.7", "--weight", "70000"],
        "70000",
    )?;
    expect_error(
        &dir,
        &["backend", "add", "10.61.0.200:80/tcp", "10.61.0.7"],
        "unknown VIP",
    )?;
    expect_error(
        &dir,
        &["backend", "remove", vip, "10.61.0.77"],
        "unknown backend",
    )?;
    expect_error(
        &dir,
        &[
            "backend",
            "add",
            vip,
            "2001:db8::1",
            "--mac",
            "02:00:00:00:00:01",
        ],
        "different address families",
    )?;
    expect_error(&dir, &["vip", "add", "10.61.0.300:80/tcp"], "invalid VIP")?;
    expect_error(&dir, &["vip", "add", "10.61.0.100:99999/tcp"], "port")?;
    expect_error(
        &dir,
        &[
            "backend",
            "add",
            vip,
            "10.61.0.100",
            "--mac",
            "02:00:00:00:00:01",
        ],
        "the VIP's own address",
    )?;
    expect_error(
        &dir,
        &["backend", "add", vip, "10.61.0.7:8080"],
        "l2 forwarding never changes ports",
    )?;
    expect_error(
        &dir,
        &["backend", "add", vip, "10.61.0.7", "--weight", "-5"],
        "weight -5 is out of range",
    )?;
    expect_error(
        &dir,
        &["vip", "add", "2001:db8::50:80/tcp"],
        "needs brackets",
    )?;
    expect_error(
        &dir,
        &[
            "backend",
            "add",
            vip,
            "10.61.0.56",
            "--mac",
            "ff:ff:ff:ff:ff:ff",
        ],
        "unicast",
    )?;
    assert_eq!(
        dir.vips()?,
        before,
        "a failed command changed the agent's state"
    );
    assert_eq!(
        std::fs::read_to_string(dir.state_file())?,
        state_before,
        "a failed command changed the state file"
    );

    // Exit codes follow the error's kind.
    let code = |args: &[&str]| dir.cli(args).map(|o| o.status.code());
    assert_eq!(code(&["vip", "add", vip])?, Some(4), "conflict");
    assert_eq!(
        code(&["backend", "remove", vip, "10.61.0.77"])?,
        Some(3),
        "not found"
    );

    // A backend that does not answer ARP is accepted as `no-mac`: kept out of the table,
    // blocking nothing; removing it works.
    let out = dir.cli_ok(&["backend", "add", vip, "10.61.0.55"])?;
    assert!(out.contains("has no MAC yet"), "{out}");
    let listed = dir.cli_ok(&["backend", "list", vip])?;
    let row = listed
        .lines()
        .find(|l| l.contains("10.61.0.55"))
        .unwrap_or("");
    assert!(row.contains("no-mac") && row.contains("0.0%"), "{listed}");
    assert!(
        listed.contains("75.0%"),
        "others keep their shares: {listed}"
    );
    dir.cli_ok(&["backend", "remove", vip, "10.61.0.55"])?;

    // Drain takes the backend out of the table; weight changes the shares; trace agrees.
    dir.cli_ok(&["backend", "drain", vip, "10.61.0.2"])?;
    let listed = dir.cli_ok(&["backend", "list", vip])?;
    assert!(
        listed.contains("draining") && listed.contains("100.0%"),
        "{listed}"
    );
    let trace = dir.cli_ok(&["trace", "192.0.2.1:5000", vip])?;
    assert!(trace.contains("10.61.0.9"), "{trace}");
    // An every-port VIP on the same address: the kernel matches the exact port first, and
    // trace says which VIP a port belongs to.
    let wild = "10.61.0.100:*/tcp";
    dir.cli_ok(&["vip", "add", wild])?;
    dir.cli_ok(&[
        "backend",
        "add",
        wild,
        "10.61.0.9",
        "--mac",
        "02:00:00:00:00:09",
    ])?;
    expect_error(
        &dir,
        &["trace", "192.0.2.1:5000", wild],
        "give the packet's port",
    )?;
    expect_error(
        &dir,
        &["trace", "192.0.2.1:5000", wild, "--dport", "80"],
        "go to VIP 10.61.0.100:80/tcp",
    )?;
    expect_error(
        &dir,
        &["trace", "192.0.2.1:5000", vip, "--dport", "81"],
        "serves port 80 only",
    )?;
    let t: lb_userspace::api::protocol::Trace = serde_json::from_str(&dir.cli_ok(&[
        "trace",
        "192.0.2.1:5000",
        wild,
        "--dport",
        "8080",
        "--json",
    ])?)?;
    assert_eq!(
        t.slot_backend,
        Some("10.61.0.9".parse::<std::net::IpAddr>()?.into()),
        "{t:?}"
    );
    // The slot is the one the kernel computes for that 5-tuple (the shared `slot_of`).
    let key = lb_userspace::net::flow_key(
        "192.0.2.1".parse()?,
        5000,
        "10.61.0.100".parse()?,
        8080,
        lb_common::PROTO_TCP,
    );
    let want = lb_common::slot_of(&key, lb_common::LbConfig::DEFAULT.hash_seed, false, 65537);
    assert_eq!(Some(t.slot), want);
    dir.cli_ok(&["vip", "remove", wild])?;
    dir.cli_ok(&["backend", "drain", vip, "10.61.0.2", "--undo"])?;
    dir.cli_ok(&["backend", "weight", vip, "10.61.0.2", "100"])?;
    let listed = dir.cli_ok(&["backend", "list", vip])?;
    assert!(listed.contains("50.0%"), "{listed}");
    dir.cli_ok(&["backend", "remove", vip, "10.61.0.9"])?;
    dir.cli_ok(&["vip", "remove", vip])?;
    assert_eq!(dir.vips()?, []);
    // The backend namespace's ARP and the agent's own probes went through XDP: counted.
    let stats = dir.stats()?;
    let packets = |name: &str| stats.global.get(name).map(|c| c.packets);
    assert!(packets("passed_not_vip") > Some(0), "{stats:?}");
    assert_eq!(packets("forwarded"), Some(0), "{stats:?}");
    assert_eq!(stats.agent.not_converged, None, "{stats:?}");
    Ok(())
}

#[test]
fn clear_errors_without_an_agent_or_privileges() -> anyhow::Result<()> {
    let dir = AgentDir::new("noag")?;
    expect_error(&dir, &["vip", "list"], "the agent is not reachable")?;
    let out = dir.cli(&["run", "--iface", "no-such-if0"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interface `no-such-if0` does not exist")
    );
    // Without privileges (setpriv drops to nobody), and root without CAP_PERFMON: one line
    // naming what is missing, exit 9, nothing created.
    for (args, missing) in [
        (
            &["--reuid=65534", "--regid=65534", "--clear-groups"][..],
            "missing: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON",
        ),
        (
            &["--inh-caps=-perfmon", "--bounding-set=-perfmon"][..],
            "missing: CAP_PERFMON",
        ),
    ] {
        let out = Command::new("setpriv")
            .args(args)
            .arg(lb_binary()?)
            .args(["run", "--iface", "lo", "--bpffs"])
            .arg(&dir.bpffs)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(9), "{err}");
        assert!(err.contains(missing) && err.lines().count() == 1, "{err}");
        assert!(
            !dir.bpffs.join("xdp-lb").exists(),
            "a refused start created pins"
        );
    }
    // A first start that fails late (native XDP on `lo` is refused at attach, after the maps
    // were created and pinned): exit 7, and no pin, lock or socket is left behind.
    let ns = Netns::new("noagn")?;
    let out = ns
        .command(lb_binary()?.to_str().unwrap_or("lb"))
        .arg("--socket")
        .arg(dir.socket())
        .args(["run", "--iface", "lo", "--mode", "native", "--bpffs"])
        .arg(&dir.bpffs)
        .arg("--state-file")
        .arg(dir.state_file())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("--mode generic"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.bpffs.join("xdp-lb"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!dir.socket().exists(), "socket left behind");
    Ok(())
}

#[test]
fn kill_9_keeps_forwarding_and_restart_restores_state() -> anyhow::Result<()> {
    let n = TwoHosts::new("rs", 62)?;
    let dir = AgentDir::new("rs")?;
    let vip = "10.62.0.100:80/tcp";
    let mut agent = dir.spawn_agent(&n.lb, &n.veth.a, &[])?;
    dir.cli_ok(&["vip", "add", vip, "--source-hash"])?;
    dir.cli_ok(&["backend", "add", vip, "10.62.0.2"])?;
    dir.cli_ok(&[
        "backend",
        "add",
        vip,
        "10.62.0.8",
        "--mac",
        "02:00:00:00:00:08",
    ])?;
    let before = dir.vips()?;
    let trace_before = dir.cli_ok(&["trace", "192.0.2.9:1234", vip, "--json"])?;

    agent.kill();
    // The program stays attached through the pinned link.
    let out = Command::new("ip")
        .args(["-n", n.lb.name(), "link", "show", &n.veth.a])
        .output()?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("xdp"),
        "program detached on kill -9"
    );

    let agent = dir.spawn_agent(&n.lb, &n.veth.a, &[])?;
    assert_eq!(dir.vips()?, before, "state not restored");
    assert_eq!(
        dir.cli_ok(&["trace", "192.0.2.9:1234", vip, "--json"])?,
        trace_before
    );
    let lines = agent.terminate(Duration::from_secs(10))?;
    assert!(lines.iter().any(|l| l.starts_with("detached")), "{lines:?}");
    let out = Command::new("ip")
        .args(["-n", n.lb.name(), "link", "show", &n.veth.a])
        .output()?;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("xdp"),
        "program left attached after a clean stop"
    );
    assert!(
        !dir.bpffs.join("xdp-lb").join(&n.veth.a).exists(),
        "pins left behind"
    );
    Ok(())
}

fn health_of(dir: &AgentDir, addr: &str) -> anyhow::Result<String> {
    dir.backend_health(addr)
}

fn wait_health(
    dir: &AgentDir,
    addr: &str,
    want: &str,
    within: Duration,
) -> anyhow::Result<Duration> {
    wait_until(
        within,
        &format!("backend {addr} {want}"),
        || Ok(health_of(dir, addr)? == want),
        || health_of(dir, addr).unwrap_or_else(|e| e.to_string()),
    )
}

fn samples(ns: &Netns, bind: &str, port: u16) -> anyhow::Result<ChildGuard> {
    let mut cmd = ns.command(lb_binary()?.to_str().unwrap_or("lb"));
    cmd.args([
        "samples",
        "--count",
        "1",
        "--base-port",
        &port.to_string(),
        "--bind",
        bind,
        "--duration",
        "120",
    ]);
    let mut child = ChildGuard::spawn(cmd, "lb samples")?;
    child.wait_for_line(Duration::from_secs(10), |l| l.contains("listening"))?;
    Ok(child)
}

#[test]
fn health_checks_take_backends_out_and_back() -> anyhow::Result<()> {
    let n = TwoHosts::new("hc", 63)?;
    let dir = AgentDir::new("hc")?;
    let _agent = dir.spawn_agent(&n.lb, &n.veth.a, &[])?;
    let vip = "10.63.0.100:8080/tcp";
    let server = samples(&n.backend, "10.63.0.2", 8080)?;
    dir.cli_ok(&[
        "vip",
        "add",
        vip,
        "--health",
        "http",
        "--interval-ms",
        "200",
        "--timeout-ms",
        "150",
        "--fall",
        "2",
        "--rise",
        "2",
    ])?;
    dir.cli_ok(&["backend", "add", vip, "10.63.0.2"])?;
    dir.cli_ok(&[
        "backend",
        "add",
        vip,
        "10.63.0.9",
        "--mac",
        "02:00:00:00:00:09",
    ])?;
    // 10.63.0.9 does not exist: out after `fall` failed probes.
    wait_health(&dir, "10.63.0.9", "down", Duration::from_secs(3))?;
    assert_eq!(health_of(&dir, "10.63.0.2")?, "up");
    let listed = dir.cli_ok(&["backend", "list", vip])?;
    assert!(
        listed.contains("100.0%"),
        "live backend should hold the whole table: {listed}"
    );

    // Kill the live backend's server: out within interval x fall + 1 s.
    drop(server);
    let took = wait_health(
        &dir,
        "10.63.0.2",
        "down",
        Duration::from_millis(200 * 2 + 1000),
    )?;
    eprintln!("backend went down after {took:?}");
    // Both down: the table is empty, in the listing and in the data plane (trace).
    let v = dir.vips()?;
    for b in &v[0].backends {
        assert_eq!(b.share_pct, 0.0, "{v:?}");
        assert_eq!(b.serving, Serving::Down, "{v:?}");
    }
    let trace = dir.cli_ok(&["trace", "192.0.2.1:5000", vip, "--json"])?;
    let t: serde_json::Value = serde_json::from_str(&trace)?;
    assert_eq!(t["slot_backend"], serde_json::Value::Null, "{t}");

    // Restart it: back in.
    let _server = samples(&n.backend, "10.63.0.2", 8080)?;
    wait_health(&dir, "10.63.0.2", "up", Duration::from_secs(3))?;
    Ok(())
}

#[test]
fn apply_shows_the_plan_and_dry_run_changes_nothing() -> anyhow::Result<()> {
    let n = TwoHosts::new("ap", 64)?;
    let dir = AgentDir::new("ap")?;
    let _agent = dir.spawn_agent(&n.lb, &n.veth.a, &["--ring-size", "16381"])?;
    let cfg = dir.dir.join("lb.toml");
    std::fs::write(
        &cfg,
        r#"
[[vip]]
address = "10.64.0.100:80/tcp"
backend = [
  { address = "10.64.0.2", weight = 1 },
  { address = "10.64.0.8", weight = 3, mac = "02:00:00:00:00:08" },
]
"#,
    )?;
    let cfg = cfg.to_string_lossy().to_string();
    let plan = dir.cli_ok(&["apply", "-f", &cfg, "--dry-run"])?;
    assert!(
        plan.contains("add 10.64.0.100:80/tcp: 100.0% of slots move"),
        "{plan}"
    );
    assert!(
        plan.contains("75.00%") && plan.contains("dry run"),
        "{plan}"
    );
    assert_eq!(dir.vips()?, [], "dry run changed state");
    let applied = dir.cli_ok(&["apply", "-f", &cfg])?;
    assert!(applied.contains("applied"), "{applied}");
    assert_eq!(dir.vips()?.len(), 1);
    let again = dir.cli_ok(&["apply", "-f", &cfg, "--dry-run"])?;
    assert!(again.contains("no changes"), "{again}");
    // A broken file is refused whole.
    std::fs::write(
        dir.dir.join("bad.toml"),
        "[[vip]]\naddress = \"10.64.0.100:80/tcp\"\nbackend = [ { address = \"10.64.0.2\", weight = 99999 } ]\n",
    )?;
    expect_error(
        &dir,
        &["apply", "-f", &dir.dir.join("bad.toml").to_string_lossy()],
        "out of range",
    )?;
    assert_eq!(dir.vips()?.len(), 1);
    // One apply that removes a VIP and adds another: the freed VIP id is reused at once.
    std::fs::write(
        dir.dir.join("swap.toml"),
        "[[vip]]\naddress = \"10.64.0.101:80/tcp\"\nbackend = [ { address = \"10.64.0.2\" } ]\n",
    )?;
    dir.cli_ok(&["apply", "-f", &dir.dir.join("swap.toml").to_string_lossy()])?;
    let v = dir.vips()?;
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].vip.to_string(), "10.64.0.101:80/tcp");
    let trace = dir.cli_ok(&["trace", "192.0.2.1:5000", "10.64.0.101:80/tcp"])?;
    assert!(trace.contains("10.64.0.2"), "{trace}");
    Ok(())
}

#[test]
fn metrics_are_served_in_prometheus_text() -> anyhow::Result<()> {
    let n = TwoHosts::new("me", 65)?;
    let dir = AgentDir::new("me")?;
    let _agent = dir.spawn_agent(&n.lb, &n.veth.a, &["--metrics", "127.0.0.1:9464"])?;
    dir.cli_ok(&["vip", "add", "10.65.0.100:80/tcp"])?;
    dir.cli_ok(&["backend", "add", "10.65.0.100:80/tcp", "10.65.0.2"])?;
    let body = n.lb.run(|| -> std::io::Result<String> {
        let mut s = TcpStream::connect("127.0.0.1:9464")?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    assert!(
        body.contains("lb_packets_total{reason=\"passed_not_vip\"}")
            && body.contains("lb_flow_events_total{event=\"flow_syn_placed\"}")
            && !body.contains("reason=\"flow_"),
        "{body}"
    );
    assert!(
        body.contains("lb_backend_up{vip=\"10.65.0.100:80/tcp\",backend=\"10.65.0.2\"} 1"),
        "{body}"
    );
    Ok(())
}
