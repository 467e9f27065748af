//! `cargo xtask demo`: the seed's scene (a web app behind a load balancer) with a real XDP load
//! balancer. Builds the demo network (client, load balancer, three backends on one bridge in
//! its own namespace), starts the sample backends and the agent in native mode, configures a
//! VIP through the CLI, sends a few hundred HTTP requests on new connections, reports which
//! backend answered and the agent's counters, and removes everything (also on Ctrl-C or
//! failure). `--keep` leaves the network up until Ctrl-C and prints commands to explore it.
//! `--mode ipip|gue`: the routed scene; `--fleet`: three nodes following etcd (`fleet.rs`);
//! `--seed`: the seed's nginx scene through NAT (`seed.rs`).
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
    routed::{CLIENT4, Routed, VIP4, backend4},
    topo::{DemoNet, PORT, VIP, backend_index, backend_ip, get, http_request},
};

mod fleet;
mod seed;

const REQUESTS: usize = 300;

fn main() {
    if let Err(err) = run() {
        eprintln!("demo: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let keep = args.iter().any(|a| a == "--keep");
    let mode = args
        .iter()
        .position(|a| a == "--mode")
        .and_then(|i| args.get(i + 1))
        .map_or("l2", String::as_str);
    if args.iter().any(|a| a == "--fleet") {
        return fleet::run(keep);
    }
    if args.iter().any(|a| a == "--seed") {
        return seed::run(keep);
    }
    match mode {
        "l2" => l2_demo(keep),
        "ipip" | "gue" => routed_demo(mode, keep),
        other => bail!("unknown demo mode `{other}`: use l2, ipip or gue"),
    }
}

/// Which backend answered how often, with a bar each.
fn print_spread(counts: &BTreeMap<usize, usize>, failed: usize, addr: impl Fn(usize) -> String) {
    for (i, n) in counts {
        println!(
            "  backend {i} ({}): {n:>4} answers  {:>5.1}%  {}",
            addr(*i),
            100.0 * *n as f64 / REQUESTS as f64,
            "#".repeat(n / 5)
        );
    }
    println!("  failed: {failed}");
}

/// An error once Ctrl-C was pressed (checked between the demo's steps).
fn interrupted(stop: &AtomicBool) -> anyhow::Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted: tearing the demo network down");
    }
    Ok(())
}

fn wait_for_ctrl_c(stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last lines of a demo: how long it took, and failure if any request failed.
fn finish(started: Instant, failed: usize) -> anyhow::Result<()> {
    println!(
        "\ndemo: removing the network ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} of {REQUESTS} requests failed");
    }
    Ok(())
}

/// Ctrl-C sets the flag; `check` turns it into an error that tears the network down.
fn interrupt_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    Ok(stop)
}

/// The routed scene: client and backends in other subnets than the load balancer, packets
/// encapsulated (`ipip` or `gue`) to backends that run `lb decap`; backend 3 has no decap
/// program, and the health checks through the tunnel take it out.
fn routed_demo(mode: &str, keep: bool) -> anyhow::Result<()> {
    let stop = interrupt_flag()?;
    let check = || interrupted(&stop);
    let started = Instant::now();
    println!("demo: building the routed network (client, router, load balancer, 3 backends)");
    let mut net = Routed::new("demo")?;
    for i in 1..=3 {
        net.start_sample(i)?;
    }
    for i in [1, 2] {
        println!("demo: backend {i}: $ {}", net.decap(i, &[])?.trim());
    }
    println!("demo: backend 3: no decap program (it should be reported down)");
    net.start_agent(&[])?;
    check()?;
    let vip = format!("{VIP4}:80/tcp");
    net.lb(&[
        "vip",
        "add",
        &vip,
        "--forward",
        mode,
        "--health",
        "http",
        "--interval-ms",
        "300",
        "--timeout-ms",
        "200",
        "--rise",
        "1",
    ])?;
    for i in 1..=3 {
        net.lb(&["backend", "add", &vip, &backend4(i)])?;
    }
    println!(
        "demo: $ lb vip add {vip} --forward {mode} --health http; lb backend add {vip} 10.4{{1,2,3}}.0.2"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        check()?;
        let list = net.lb(&["backend", "list", &vip])?;
        if list.matches("serving").count() == 2 && list.contains("down") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    print!("{}", net.lb(&["backend", "list", &vip])?);
    let t = Instant::now();
    let (counts, failed) = routed_requests(&net, &check)?;
    println!(
        "\ndemo: {REQUESTS} HTTP requests from the client ({CLIENT4}) to {vip} over {mode}, a new connection each ({:.1} s):",
        t.elapsed().as_secs_f64()
    );
    print_spread(&counts, failed, backend4);
    println!("\ndemo: agent counters ($ lb stats)");
    print!("{}", net.lb(&["stats"])?);
    println!("\ndemo: backend 1's decap counters ($ lb decap --iface bk1 --stats)");
    print!("{}", net.decap(1, &["--stats"])?);
    if keep {
        println!("\ndemo: the network stays up until Ctrl-C. Explore it:");
        println!(
            "  ip netns exec {} curl -s http://{VIP4}/",
            net.client.name()
        );
        println!(
            "  {} --socket {} trace {CLIENT4}:40000 {vip}",
            lb_binary()?.display(),
            net.dir.socket().display()
        );
        wait_for_ctrl_c(&stop);
    }
    finish(started, failed)
}

/// `REQUESTS` HTTP requests from the routed network's client to VIP4:80, a new connection
/// each: which backend answered how often, and how many failed.
fn routed_requests(
    net: &Routed,
    check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<(BTreeMap<usize, usize>, usize)> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    let mut failed = 0;
    let target = std::net::SocketAddr::new(VIP4.parse()?, 80);
    for _ in 0..REQUESTS {
        check()?;
        let answer =
            http_request(&net.client, target, &get("/")).and_then(|body| backend_index(&body));
        match answer {
            Ok(i) => *counts.entry(i).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    Ok((counts, failed))
}

/// The default scene: one segment, L2 direct server return.
fn l2_demo(keep: bool) -> anyhow::Result<()> {
    let stop = interrupt_flag()?;
    let check = || interrupted(&stop);
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
    print_spread(&counts, failed, backend_ip);
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
        wait_for_ctrl_c(&stop);
    }
    finish(started, failed)
}
