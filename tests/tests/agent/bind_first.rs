//! The metrics listener is bound before anything is attached: with its port taken, `lb run`
//! exits non-zero with one line naming the address, and leaves no program on the interface,
//! no pin, no applied configuration and no control socket behind. The same command then
//! starts once the port is free (so the port, and nothing else, was the reason).
use std::{net::TcpListener, process::Output, time::Duration};

use lb_tests::{AgentDir, TwoHosts, wait_until};

const METRICS: &str = "127.0.0.1:9466";

/// `lb run` on the namespace's veth with `--metrics`, a config holding one VIP, and a bounded
/// life (`--duration`), so a start that wrongly succeeds still ends.
fn run_agent(n: &TwoHosts, dir: &AgentDir, duration: &str) -> anyhow::Result<Output> {
    let config = dir.dir.join("lb.toml");
    std::fs::write(
        &config,
        "[[vip]]\naddress = \"10.71.0.100:80/tcp\"\nbackend = [ { address = \"10.71.0.2\" } ]\n",
    )?;
    let mut cmd = n.lb.lb()?;
    cmd.arg("--socket").arg(dir.socket());
    cmd.args(["run", "--iface", &n.veth.a, "--mode", "generic"]);
    cmd.arg("--state-file").arg(dir.state_file());
    cmd.arg("--bpffs").arg(&dir.bpffs);
    cmd.arg("--config").arg(&config);
    cmd.args(["--metrics", METRICS, "--duration", duration]);
    Ok(cmd.output()?)
}

fn xdp_attached(n: &TwoHosts) -> anyhow::Result<bool> {
    let out =
        n.lb.command("ip")
            .args(["link", "show", &n.veth.a])
            .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("xdp"))
}

#[test]
fn a_taken_metrics_port_refuses_the_start_before_anything_is_attached() -> anyhow::Result<()> {
    let n = TwoHosts::new("bf", 71)?;
    let dir = AgentDir::new("bf")?;
    // Another process holds the port, in the agent's own namespace.
    let holder = n.lb.run(|| TcpListener::bind(METRICS))??;

    let out = run_agent(&n, &dir, "5")?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "exit code (I/O): {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(
        err.contains("binding the metrics listener") && err.contains(METRICS),
        "{err}"
    );
    assert!(!xdp_attached(&n)?, "a program was attached");
    let pins = lb_userspace::dataplane::pins::pin_dir(&dir.bpffs, &n.veth.a);
    assert!(!pins.exists(), "pins were made under {}", pins.display());
    assert!(!dir.state_file().exists(), "the config was applied");
    assert!(!dir.socket().exists(), "the control socket was left behind");

    // The port freed, the same command starts, attaches and applies its config.
    drop(holder);
    let out = run_agent(&n, &dir, "1")?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("attached to") && text.contains(&format!("metrics on http://{METRICS}")),
        "{text}"
    );
    assert!(dir.state_file().exists(), "the config was not applied");
    // It detached at the end of its --duration (XDP programs in a namespace may take a moment).
    wait_until(
        Duration::from_secs(5),
        "the program detached",
        || Ok(!xdp_attached(&n)?),
        || "still attached".to_string(),
    )?;
    Ok(())
}
