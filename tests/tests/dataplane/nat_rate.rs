//! Full NAT at rate through a NAT address pool: the rate run scaled to one client,
//! three backends and a 4-address pool on the routed network of [`super::nat`].
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    routed::Routed,
    traffic::{closing_server, server_closes},
};

use super::nat::{VIP, nat_backend, stat, target};

/// The pool addresses of [`new_connections_at_full_rate_use_the_whole_pool`], held by the load
/// balancer on eth0 (the router reaches them there, so backends' answers come back into XDP).
const POOL: [&str; 4] = ["10.30.0.21", "10.30.0.22", "10.30.0.23", "10.30.0.24"];
/// Its NAT ports: 1,500 per (address, backend), so one address gives 3 backends 4,500.
const RATE_PORTS: &str = "20000-21499";
/// Connections the run opens at most: more than one address's 4,500 ports (servers close
/// first, so each holds its port 70 s, past the run), a third of the pool's 18,000.
const RATE_MAX: u64 = 6_000;
/// Connections the run must reach for the claim to hold: more than one address could take.
const RATE_MIN: u64 = 4_600;

/// The agent's metrics listener in the rate run (inside the load balancer's namespace).
const RATE_METRICS: &str = "127.0.0.1:9100";

/// `GET /metrics` from the load balancer's namespace: the body.
fn metrics_text(net: &Routed) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    net.lb.run(|| -> anyhow::Result<String> {
        let to: SocketAddr = RATE_METRICS.parse()?;
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })?
}

fn client_syn_retrans(net: &Routed) -> anyhow::Result<u64> {
    let out = net
        .client
        .command("nstat")
        .args(["-asz", "TcpExtTCPSynRetrans"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("TcpExtTCPSynRetrans")).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or(0))
}

/// The rate run, scaled: new connections as fast as 8 client threads open them for
/// up to 8 s, servers closing first, 3 backends behind a 4-address pool whose ports per
/// address are too few for the run: no connection fails, no SYN is retransmitted, every
/// pool address carries its share, and the table (at its fullest at the end: every port is
/// held 70 s) is under half full.
#[test]
fn new_connections_at_full_rate_use_the_whole_pool() -> anyhow::Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let mut net = Routed::new("npr")?;
    for a in POOL {
        net.lb
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
    }
    let mut args = vec![
        "--nat-ports",
        RATE_PORTS,
        "--nat-entries",
        "16384",
        "--metrics",
        RATE_METRICS,
    ];
    for a in POOL {
        args.extend(["--nat-source", a]);
    }
    net.start_agent(&args)?;
    // A pool address held on the interface as /32 would pass as a VIP the node holds
    // itself; as a given NAT source it is refused with one line.
    let on_pool = format!("{}:80/tcp", POOL[1]);
    let out = net.dir.cli(&["vip", "add", &on_pool, "--forward", "nat"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("NAT source addresses"),
        "{err}"
    );
    net.lb(&["vip", "add", VIP, "--forward", "nat"])?;
    assert!(
        !net.lb(&["vip", "list"])?.contains(POOL[1]),
        "the refused VIP was kept"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut servers = Vec::new();
    // Inside the run: a failed step still stops the servers already started.
    let result = (|| -> anyhow::Result<()> {
        for i in 1..=3 {
            nat_backend(&net, i)?;
            let addr: SocketAddr = format!("10.4{i}.0.2:9000").parse()?;
            servers.push(closing_server(&net.backends[i - 1], addr, stop.clone())?);
            net.lb(&["backend", "add", VIP, &addr.to_string()])?;
        }
        // The first packets to each backend wait for its neighbour entry.
        net.client
            .run(|| (0..30).try_for_each(|_| server_closes(target())))??;
        let retrans = client_syn_retrans(&net)?;
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let start = Instant::now();
        let mut threads = Vec::new();
        for _ in 0..8 {
            let (ok, failed) = (ok.clone(), failed.clone());
            threads.push(net.client.spawn(move || {
                let mut errors = Vec::new();
                while start.elapsed() < Duration::from_secs(8)
                    && ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < RATE_MAX
                {
                    match server_closes(target()) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                errors
            })?);
        }
        let mut errors = Vec::new();
        for t in threads {
            errors.extend(t.join().map_err(|_| anyhow::anyhow!("client thread"))??);
        }
        let took = start.elapsed();
        let ok = ok.load(Ordering::Relaxed);
        let retrans = client_syn_retrans(&net)? - retrans;
        // The sweep (every 5 s) counts the table and each address.
        let deadline = Instant::now() + Duration::from_secs(12);
        let view = loop {
            let s: lb_userspace::protocol::StatsView =
                serde_json::from_str(&net.lb(&["stats", "--json"])?)?;
            let seen: u64 = s.agent.nat_pool.iter().map(|a| a.connections).sum();
            if seen >= ok || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let table = view.agent.nat_table.unwrap_or_default();
        println!(
            "{ok} connections in {:.1} s ({:.0}/s), {} failed, {retrans} SYN retransmissions; NAT table: {} of {}; per address: {:?}",
            took.as_secs_f64(),
            ok as f64 / took.as_secs_f64(),
            errors.len(),
            table.established,
            table.capacity,
            view.agent
                .nat_pool
                .iter()
                .map(|a| (a.address.to_string(), a.connections))
                .collect::<Vec<_>>()
        );
        assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(5)]);
        assert_eq!(retrans, 0, "SYNs retransmitted: a NAT port was refused");
        assert!(
            ok >= RATE_MIN,
            "only {ok} connections: fewer than one address's ports, the run shows nothing"
        );
        assert_eq!(stat(&net, "dropped_nat_no_port"), 0);
        assert!(
            table.established * 2 < table.capacity,
            "NAT table {} of {}",
            table.established,
            table.capacity
        );
        // IPv4's pool, then IPv6's: its encapsulation source (no `--nat-source` of it).
        let v4: Vec<_> = view
            .agent
            .nat_pool
            .iter()
            .filter(|a| a.address.is_ipv4())
            .collect();
        let pool: Vec<_> = v4.iter().map(|a| a.address).collect();
        let want: Vec<std::net::IpAddr> = POOL.iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(pool, want, "lb stats lists the pool");
        for a in v4 {
            // A quarter each expected: 15 % is far outside the random spread of thousands.
            assert!(
                a.connections * 100 >= ok * 15,
                "{}: {} of {ok}",
                a.address,
                a.connections
            );
            // Its ports in use per backend: all three, within each one's 1,500, adding up to
            // its connections; nothing refused on it.
            let ports: Vec<u64> = a.ports_by_backend.iter().map(|b| b.ports).collect();
            assert_eq!(ports.len(), 3, "{}: {:?}", a.address, a.ports_by_backend);
            assert!(ports.iter().all(|p| (1..=1500).contains(p)), "{ports:?}");
            assert_eq!(ports.iter().sum::<u64>(), a.connections, "{}", a.address);
            assert_eq!((a.refused_no_port, a.refused_table_full), (0, 0));
        }
        let text = net.lb(&["stats"])?;
        assert!(
            text.contains("ports in use: 10.41.0.2:9000 ") && text.contains("0 no free port"),
            "{text}"
        );
        // /metrics has the same per address: the sweep's figure, and the refusal counters.
        let metrics = metrics_text(&net)?;
        let a = &view.agent.nat_pool[0];
        let b = &a.ports_by_backend[0];
        // (A sweep may have run since `view`: the ports are compared within a margin.)
        let ports = format!(
            "lb_nat_address_backend_ports{{address=\"{}\",backend=\"{}\"}} ",
            a.address, b.backend
        );
        let seen: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&ports)?.parse().ok())
            .unwrap_or_else(|| panic!("{ports} not in /metrics"));
        assert!(
            seen.abs_diff(b.ports) * 10 <= b.ports,
            "{seen} vs {}",
            b.ports
        );
        let refused = format!(
            "lb_nat_address_refused_total{{address=\"{}\",reason=\"no_port\"}} 0",
            a.address
        );
        assert!(
            metrics.lines().any(|l| l == refused),
            "{refused} not in /metrics"
        );
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    result
}
