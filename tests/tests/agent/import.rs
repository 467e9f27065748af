//! `lb import nginx` end to end: the real binary against a real agent. A DSR-compatible
//! upstream is imported and applied (the plan is shown, the VIP is live); the seed's config is
//! refused with one line naming why (a loopback backend, ports a DSR mode cannot translate)
//! until given what it needs, then applied as a NAT VIP; refusals change nothing.
use std::process::Command;

use lb_tests::{AgentDir, Netns, VethPair, lb_binary};

fn fixture(name: &str) -> String {
    format!("{}/fixtures/nginx/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn an_nginx_upstream_is_applied_and_the_seed_is_refused_with_the_reason() -> anyhow::Result<()> {
    let lb = Netns::new("imp")?;
    let peer = Netns::new("imq")?;
    let veth = VethPair::new(&lb, "10.67.0.1/24", &peer, "10.67.0.2/24")?;
    let dir = AgentDir::new("im")?;
    let _agent = dir.spawn_agent(&lb, &veth.a, &[])?;

    let conf = dir.dir.join("app.conf");
    std::fs::write(
        &conf,
        "http {\n  upstream app {\n    server 10.67.0.2:80 weight=2;\n    server 10.67.0.3:80;\n    server 10.67.0.4:80 backup;\n  }\n  server {\n    listen 10.67.0.100:80;\n    location / { proxy_pass http://app; }\n  }\n}\n",
    )?;
    let conf = conf.to_string_lossy().to_string();
    // Printed first (a config file on stdout, notes on stderr), then applied with its plan.
    let out = dir.cli(&["import", "nginx", &conf])?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.starts_with("[[vip]]\naddress = \"10.67.0.100:80/tcp\""),
        "{stdout}"
    );
    assert!(
        stderr.contains("line 5: not translated: backup server 10.67.0.4:80 in upstream app"),
        "{stderr}"
    );
    assert!(dir.vips()?.is_empty(), "printing changes nothing");
    let applied = dir.cli_ok(&["import", "nginx", &conf, "--apply"])?;
    assert!(
        applied.contains("+ backend 10.67.0.2") && applied.contains("applied"),
        "{applied}"
    );
    let vips = dir.vips()?;
    assert_eq!(vips.len(), 1);
    assert_eq!(vips[0].backends.len(), 2);
    assert_eq!(vips[0].backends[0].weight, 200);
    println!("{applied}");

    // The seed: one line each, exit code 2 (invalid), nothing changed.
    let seed = fixture("seed.conf");
    for (extra, want) in [
        (
            vec!["--vip-address", "10.67.0.101"],
            "127.0.0.1, this host's own loopback",
        ),
        (
            vec![
                "--vip-address",
                "10.67.0.101",
                "--map-host",
                "localhost=10.67.0.2",
                "--forward",
                "gue",
            ],
            "backend port 8000 differs from the VIP's port 80: gue forwarding keeps the port; import with --forward nat",
        ),
        (
            vec!["--map-host", "localhost=10.67.0.2"],
            "has no address: give the VIP's address with --vip-address",
        ),
        (vec!["--map-host", "localhost"], "expected NAME=ADDRESS"),
    ] {
        let mut args = vec!["import", "nginx", seed.as_str(), "--apply"];
        args.extend(extra);
        let out = dir.cli(&args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        // One line (clap adds its usual "For more information, try '--help'." to a usage error).
        assert!(
            err.lines().next().is_some_and(|l| l.contains(want)),
            "{err}"
        );
        println!("{}", err.lines().next().unwrap_or(""));
    }
    assert_eq!(dir.vips()?.len(), 1, "refusals changed nothing");
    // With an address for localhost and the VIP, the seed is the NAT scene.
    let applied = dir.cli_ok(&[
        "import",
        "nginx",
        seed.as_str(),
        "--vip-address",
        "10.67.0.101",
        "--map-host",
        "localhost=10.67.0.2",
        "--apply",
    ])?;
    assert!(
        applied.contains("+ backend 10.67.0.2:8000")
            && applied.contains("+ backend 10.67.0.2:8001"),
        "{applied}"
    );
    let vips = dir.vips()?;
    let seed_vip = vips
        .iter()
        .find(|v| v.vip.to_string() == "10.67.0.101:80/tcp")
        .expect("the seed's VIP");
    assert_eq!(seed_vip.forward.to_string(), "nat");
    let missing = Command::new(lb_binary()?)
        .args(["import", "nginx", "/nonexistent.conf"])
        .output()?;
    assert_ne!(missing.status.code(), Some(0));
    Ok(())
}
