//! VIP address pools and the node's own addresses on a single agent: a VIP outside the
//! `--vip-prefix` pools, or on an address the node itself uses, is refused on every path (CLI,
//! `apply`, `import --apply`) with one line, a non-zero exit and no change; a host address
//! held on the interface for the VIP (the L2 setup) is taken.
use lb_tests::{AgentDir, TwoHosts, lb_binary};

/// `lb args` fails with exit code 2 (invalid) and one error line holding every `want`; the
/// only other stderr lines allowed are `lb import`'s notes on the file it read.
fn refused(dir: &AgentDir, args: &[&str], want: &[&str]) -> anyhow::Result<()> {
    let out = dir.cli(args)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "`lb {}`: {err}", args.join(" "));
    let (errors, notes): (Vec<&str>, Vec<&str>) = err.lines().partition(|l| l.starts_with("lb: "));
    assert_eq!(errors.len(), 1, "not one error line: {err:?}");
    assert!(
        notes
            .iter()
            .all(|l| args[0] == "import" && l.contains(".conf: line ")),
        "{err:?}"
    );
    for w in want {
        assert!(
            errors[0].contains(w),
            "`lb {}`: {err:?} lacks {w:?}",
            args.join(" ")
        );
    }
    Ok(())
}

#[test]
fn vips_outside_the_pools_or_on_the_nodes_own_address_are_refused() -> anyhow::Result<()> {
    let n = TwoHosts::new("vpl", 68)?;
    // The L2 setup: the load balancer holds the VIP as a host address to answer ARP for it.
    n.lb.ip(&["addr", "add", "10.68.0.100/32", "dev", &n.veth.a])?;
    let dir = AgentDir::new("vpl")?;
    let mut agent = dir.spawn_agent(&n.lb, &n.veth.a, &["--vip-prefix", "10.68.0.0/24"])?;
    dir.cli_ok(&["vip", "add", "10.68.0.100:80/tcp"])?;
    let before = dir.vips()?;
    let state_before = std::fs::read_to_string(dir.state_file())?;

    // Outside the pools.
    let outside = ["10.99.0.5", "outside this node's VIP pools (10.68.0.0/24)"];
    refused(&dir, &["vip", "add", "10.99.0.5:80/tcp"], &outside)?;
    // The node's own address (10.68.0.1/24 on its interface, the source of its routes),
    // though inside the pool: all ports of it would take the node's SSH.
    let own = ["10.68.0.1", "this node's own address"];
    refused(&dir, &["vip", "add", "10.68.0.1:*/tcp"], &own)?;
    // The same through `apply` (also a dry run) and `import nginx --apply`.
    let cfg = dir.dir.join("lb.toml");
    std::fs::write(
        &cfg,
        "[[vip]]\naddress = \"10.68.0.1:22/tcp\"\nbackend = [ { address = \"10.68.0.2\" } ]\n",
    )?;
    let cfg = cfg.to_string_lossy().to_string();
    refused(&dir, &["apply", "-f", &cfg], &own)?;
    refused(&dir, &["apply", "-f", &cfg, "--dry-run"], &own)?;
    let conf = dir.dir.join("nginx.conf");
    std::fs::write(
        &conf,
        "http {\n  upstream app { server 10.68.0.2:80; }\n  server {\n    listen 10.99.0.5:80;\n    location / { proxy_pass http://app; }\n  }\n}\n",
    )?;
    let conf = conf.to_string_lossy().to_string();
    refused(&dir, &["import", "nginx", &conf, "--apply"], &outside)?;

    assert_eq!(dir.vips()?, before, "a refused VIP changed the state");
    assert_eq!(std::fs::read_to_string(dir.state_file())?, state_before);

    // Restarted with a narrower pool: the saved VIP now outside it does not come back.
    agent.kill();
    let _agent = dir.spawn_agent(&n.lb, &n.veth.a, &["--vip-prefix", "10.68.0.200/29"])?;
    assert_eq!(
        dir.vips()?,
        [],
        "a saved VIP outside the new pools is served"
    );
    Ok(())
}

/// A fleet node takes its VIPs from a store it does not trust to choose addresses: without a
/// pool it does not start (one line, nothing attached).
#[test]
fn a_store_without_a_pool_is_refused_at_start() -> anyhow::Result<()> {
    let n = TwoHosts::new("vps", 69)?;
    let dir = AgentDir::new("vps")?;
    let out =
        n.lb.command(&lb_binary()?.to_string_lossy())
            .arg("--socket")
            .arg(dir.socket())
            .args(["run", "--iface", &n.veth.a, "--bpffs"])
            .arg(&dir.bpffs)
            .args(["--store", "etcd://127.0.0.1:2379", "--cluster", "t"])
            .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err:?}");
    assert!(
        err.contains("--store needs at least one --vip-prefix"),
        "{err}"
    );
    assert!(!dir.socket().exists(), "a refused start left its socket");
    Ok(())
}
