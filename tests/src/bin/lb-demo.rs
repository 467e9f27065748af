//! `cargo xtask demo`: the seed's scene (a web app behind a load balancer) with a real XDP load
//! balancer. Builds the demo network (client, load balancer, three backends on one bridge in
//! its own namespace), starts the sample backends and the agent in native mode, configures a
//! VIP through the CLI, sends a few hundred HTTP requests on new connections, reports which
//! backend answered and the agent's counters, and removes everything (also on Ctrl-C or
//! failure). `--keep` leaves the network up until Ctrl-C and prints commands to explore it.
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_tests::{
    lb_binary,
    topo::{DemoNet, PORT, VIP, backend_ip},
};

const REQUESTS: usize = 300;

fn main() {
    if let Err(err) = run() {
        eprintln!("demo: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let check = || -> anyhow::Result<()> {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted: tearing the demo network down");
        }
        Ok(())
    };
    let started = Instant::now();
    println!(
        "demo: building the network: client, load balancer, 3 backends on a bridge (own namespaces)"
    );
    let mut net = DemoNet::build(3, "native")?;
    check()?;
    net.start_backends()?;
    println!(
        "demo: sample backends answer \"hello from backend i\" on port {PORT} in each backend namespace"
    );
    net.start_agent(&[])?;
    println!("demo: agent attached to the load balancer's eth0 (native XDP)");
    check()?;
    let vip = format!("{VIP}:{PORT}/tcp");
    net.lb(&[
        "vip",
        "add",
        &vip,
        "--health",
        "http",
        "--interval-ms",
        "500",
    ])?;
    for i in 0..3 {
        net.lb(&["backend", "add", &vip, &backend_ip(i)])?;
    }
    println!("demo: $ lb vip add {vip} --health http; lb backend add {vip} 10.200.0.1{{1,2,3}}");
    print!("{}", net.lb(&["backend", "list", &vip])?);
    check()?;

    let t = Instant::now();
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..REQUESTS {
        check()?;
        match net.http_get(VIP.parse()?, PORT) {
            Ok(i) => *counts.entry(i).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "\ndemo: {REQUESTS} HTTP requests from the client to {vip}, a new connection each ({secs:.1} s):"
    );
    for (i, n) in &counts {
        println!(
            "  backend {i} ({}): {n:>4} answers  {:>5.1}%  {}",
            backend_ip(*i),
            100.0 * *n as f64 / REQUESTS as f64,
            "#".repeat(n / 5)
        );
    }
    println!("  failed: {failed}");
    println!("\ndemo: agent counters ($ lb stats)");
    print!("{}", net.lb(&["stats"])?);
    if keep {
        let lb = lb_binary()?;
        println!("\ndemo: the network stays up until Ctrl-C. Explore it:");
        println!(
            "  ip netns exec {} curl -s http://{VIP}/",
            net.client.name()
        );
        println!(
            "  {} --socket {} backend list",
            lb.display(),
            net.dir.socket().display()
        );
        println!(
            "  {} --socket {} stats --watch",
            lb.display(),
            net.dir.socket().display()
        );
        println!(
            "  {} --socket {} backend drain {vip} {}",
            lb.display(),
            net.dir.socket().display(),
            backend_ip(0)
        );
        println!(
            "  ip -n {} link show eth0      # the XDP program",
            net.lb.name()
        );
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!(
        "\ndemo: removing the network ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} of {REQUESTS} requests failed");
    }
    Ok(())
}
