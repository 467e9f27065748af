//! `cargo xtask demo --fleet`: the second seed's scene (an application deployed on a cluster)
//! with a fleet of load balancers. Three nodes announce the VIP over BGP to a router that
//! installs an ECMP route over them (bird on each), and follow one etcd;
//! the configuration is applied once, through one node, and every node serves it. Prints the
//! cluster status, the spread per backend and per node, then removes everything.
use std::{
    collections::BTreeMap,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    fleet::{Fleet, NODES},
    lb_binary,
    routed::{CLIENT4, VIP4, backend4},
    topo::{backend_index, get, http_request},
};

use super::{REQUESTS, finish, interrupt_flag, print_spread, wait_for_ctrl_c};

/// New flows each node placed so far for the demo's VIP.
fn new_flows(f: &Fleet) -> anyhow::Result<Vec<u64>> {
    (0..NODES)
        .map(|k| Ok(f.stats(k)?.vips.first().map_or(0, |v| v.new_flows)))
        .collect()
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    let stop = interrupt_flag()?;
    let started = Instant::now();
    println!(
        "demo: building the fleet (client, a BGP router running bird, {NODES} load balancers each announcing through its own bird, 3 backends running `lb decap`, etcd)"
    );
    let f = Fleet::bgp("demf", &[])?;
    println!(
        "demo: etcd at {}; each node: $ lb run --iface eth0 --store etcd://10.30.K.1:2379 --cluster t --node lbK --vip-prefix 10.0.0.0/8 --vip-prefix 2001:db8::/32 --announce-table 100 --bgp-socket BIRD_SOCKET",
        f.etcd.url()
    );
    let vip = format!("{VIP4}:80/tcp");
    let file = std::env::temp_dir().join(lb_tests::unique_name("demf"));
    let mut config = format!(
        "[[vip]]\naddress = \"{vip}\"\nforward = \"gue\"\nhealth = {{ kind = \"http\", path = \"/health\" }}\nbackend = ["
    );
    for i in 1..=3 {
        config.push_str(&format!(" {{ address = \"{}\" }},", backend4(i)));
    }
    config.push_str(" ]\n");
    std::fs::write(&file, &config)?;
    let path = file.to_str().context("non-UTF-8 temp path")?.to_string();
    println!("demo: the configuration, applied once through node lb0:\n{config}");
    let applied = f.lb(0, &["apply", "-f", &path]);
    let _ = std::fs::remove_file(&file);
    print!("{}", applied?);
    let (digest, took) = f.converged(&vip, None)?;
    println!("demo: live on all {NODES} nodes after {took:?} (slot-table digest {digest})");
    let learned = f.wait_route(&format!("{VIP4}/32"), &[0, 1, 2], Duration::from_secs(15))?;
    println!(
        "\ndemo: the router learned {VIP4} from all {NODES} nodes over BGP {learned:?} later; its kernel route ($ ip route show {VIP4}):"
    );
    let route = f
        .net
        .router
        .command("ip")
        .args(["route", "show", VIP4])
        .output()?;
    print!("{}", String::from_utf8_lossy(&route.stdout));
    println!("demo: each node's announcement ($ lb node status on lb0):");
    print!("{}", f.lb(0, &["node", "status"])?);
    // Health checks pass (rise 2 x 1 s) before the traffic starts.
    std::thread::sleep(Duration::from_secs(3));
    println!("\ndemo: $ lb cluster status");
    print!("{}", f.lb(1, &["cluster", "status"])?);

    let before = new_flows(&f)?;
    let t = Instant::now();
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    let mut failed = 0;
    let target = std::net::SocketAddr::new(VIP4.parse()?, 80);
    for _ in 0..REQUESTS {
        anyhow::ensure!(!stop.load(Ordering::SeqCst), "interrupted");
        match http_request(&f.net.client, target, &get("/")).and_then(|b| backend_index(&b)) {
            Ok(i) => *counts.entry(i).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    let after = new_flows(&f)?;
    println!(
        "\ndemo: {REQUESTS} HTTP requests from the client ({CLIENT4}) to {vip}, a new connection each ({:.1} s); per backend:",
        t.elapsed().as_secs_f64()
    );
    print_spread(&counts, failed, backend4);
    println!("demo: per load balancer node (new flows it placed; the router's ECMP hash chose):");
    for k in 0..NODES {
        let n = after[k] - before[k];
        println!(
            "  lb{k}: {n:>4} flows  {:>5.1}%  {}",
            100.0 * n as f64 / REQUESTS as f64,
            "#".repeat(n as usize / 5)
        );
    }
    println!("\ndemo: node lb2's view ($ lb stats, first lines)");
    for l in f.lb(2, &["stats"])?.lines().take(2) {
        println!("  {l}");
    }
    if keep {
        println!("\ndemo: the fleet stays up until Ctrl-C. Explore it:");
        println!(
            "  {} --socket {} cluster status",
            lb_binary()?.display(),
            f.net.dir_at(0).socket().display()
        );
        println!(
            "  birdc -s {} show route all {VIP4}/32",
            f.router_bird().socket().display()
        );
        println!(
            "  ip netns exec {} etcdctl --endpoints http://10.30.0.1:2379 get --prefix /xdp-lb/t/",
            f.net.router.name()
        );
        wait_for_ctrl_c(&stop);
    }
    finish(started, failed)
}
