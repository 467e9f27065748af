//! `cargo xtask demo`: a throw-away two-namespace veth network, the real `lb` attached in native mode,
//! real UDP traffic, the counters printed, and everything removed (also on Ctrl-C or failure).
use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb_tests::{ChildGuard, Netns, VethPair, lb_binary};

const PACKETS: usize = 200;

fn main() {
    if let Err(err) = run() {
        eprintln!("demo: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let lb_path = lb_binary()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing Ctrl-C handler")?;
    }
    let check = || -> anyhow::Result<()> {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted: tearing the demo network down");
        }
        Ok(())
    };

    println!("demo: building network (client ns <-veth-> load balancer ns)");
    let client = Netns::new("demoC")?;
    let lbns = Netns::new("demoL")?;
    let veth = VethPair::new(&client, "10.99.0.1/24", &lbns, "10.99.0.2/24")?;
    check()?;

    let mut cmd = lbns.command(lb_path.to_str().context("non-UTF-8 path")?);
    cmd.args([
        "run",
        "--iface",
        &veth.b,
        "--mode",
        "native",
        "--interval",
        "0",
        "--duration",
        "30",
    ]);
    let mut lb = ChildGuard::spawn(cmd, "lb run")?;
    let attached = lb.wait_for_line(Duration::from_secs(20), |l| l.starts_with("attached to"))?;
    println!("demo: lb {attached}");
    check()?;

    let receiver = lbns.run(|| UdpSocket::bind("10.99.0.2:7000"))??;
    receiver.set_read_timeout(Some(Duration::from_secs(5)))?;
    client.run(|| -> std::io::Result<()> {
        let sock = UdpSocket::bind("10.99.0.1:0")?;
        for i in 0..PACKETS {
            sock.send_to(format!("hello {i}").as_bytes(), "10.99.0.2:7000")?;
        }
        Ok(())
    })??;
    let mut buf = [0u8; 64];
    for _ in 0..PACKETS {
        receiver.recv(&mut buf).context("receiving demo traffic")?;
    }
    println!("demo: sent and received {PACKETS} UDP datagrams across the XDP program");
    check()?;

    for line in lb.terminate(Duration::from_secs(10))? {
        println!("demo: lb {line}");
    }
    println!("demo: done; removing namespaces");
    Ok(())
}
