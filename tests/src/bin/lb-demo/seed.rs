//! `cargo xtask demo --seed`: the seed's scene exactly. The seed document
//! (`../shared/seeds/004_015de59c996d3785.txt`) runs two Tornado processes on ports 8000 and
//! 8001 behind an nginx `upstream` listening on 80. Here: two sample app processes on ports
//! 8000 and 8001 of one backend host, the seed's nginx block imported with `lb import nginx`
//! (which picks NAT: the ports differ from the VIP's), then 300 refreshes and the spread, as
//! the seed tells its reader to do.
use std::time::Instant;

use anyhow::{Context as _, bail};
use lb_tests::{
    proc::sample_backend,
    routed::{CLIENT4, Routed, VIP4, backend_dev, backend4},
};

use super::{
    REQUESTS, finish, interrupt_flag, interrupted, print_spread, routed_requests, wait_for_ctrl_c,
};

/// The seed document, relative to the workspace.
const SEED_DOC: &str = "../shared/seeds/004_015de59c996d3785.txt";

/// The nginx block of the seed document (the first ```nginx fence), or the fixture copy of it
/// when the document is not there.
fn seed_nginx() -> anyhow::Result<(String, String)> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let doc = format!("{root}/{SEED_DOC}");
    if let Ok(text) = std::fs::read_to_string(&doc) {
        let block = text
            .split("```nginx")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .context("the seed document has no ```nginx block")?;
        return Ok((block.to_string(), SEED_DOC.to_string()));
    }
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/nginx/seed.conf");
    Ok((std::fs::read_to_string(fixture)?, fixture.to_string()))
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    let stop = interrupt_flag()?;
    let check = || interrupted(&stop);
    let started = Instant::now();
    println!("demo: building the routed network (client, router, load balancer, backend hosts)");
    let mut net = Routed::new("seed")?;
    let host = backend4(1);
    // The app processes' answers cross the XDP program (NAT): complete checksums on the veth.
    net.backends[0].exec("ethtool", &["-K", &backend_dev(1), "tx", "off"])?;
    for (port, index) in [(8000, 1), (8001, 2)] {
        let child = sample_backend(&net.backends[0], port, index)?;
        net.procs.push(child);
    }
    println!(
        "demo: backend host {host}: app processes on ports 8000 and 8001 (the seed's Tornado pair)"
    );
    net.start_agent(&[])?;
    check()?;
    let (conf, from) = seed_nginx()?;
    let path = net.dir.dir.join("seed-nginx.conf");
    std::fs::write(&path, &conf)?;
    println!(
        "demo: the seed's nginx block ({from}):\n{}",
        conf.trim_end()
    );
    let args = [
        "import",
        "nginx",
        path.to_str().context("path")?,
        "--vip-address",
        VIP4,
        "--map-host",
        &format!("localhost={host}"),
        "--apply",
    ];
    let out = net.dir.cli(&args)?;
    println!(
        "\ndemo: $ lb import nginx seed-nginx.conf --vip-address {VIP4} --map-host localhost={host} --apply"
    );
    print!("{}", String::from_utf8_lossy(&out.stderr));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("the import failed");
    }
    let vip = format!("{VIP4}:80/tcp");
    print!("{}", net.lb(&["backend", "list", &vip])?);
    let t = Instant::now();
    let (counts, failed) = routed_requests(&net, &check)?;
    println!(
        "\ndemo: {REQUESTS} refreshes of http://{VIP4}/ from the client ({CLIENT4}), a new connection each ({:.1} s):",
        t.elapsed().as_secs_f64()
    );
    print_spread(&counts, failed, |i| format!("{host}:{}", 7999 + i));
    println!("\ndemo: agent counters ($ lb stats)");
    print!("{}", net.lb(&["stats"])?);
    if keep {
        println!("\ndemo: the network stays up until Ctrl-C. Explore it:");
        println!(
            "  ip netns exec {} curl -s http://{VIP4}/",
            net.client.name()
        );
        wait_for_ctrl_c(&stop);
    }
    finish(started, failed)
}
