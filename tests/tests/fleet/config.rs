//! The fleet on real parts: a router spreading VIP traffic over three load balancer nodes by
//! ECMP (the routes learned from the nodes over BGP), GUE to three routed backends running `lb decap`, and a real etcd (in the router's
//! namespace, own data dir) holding the configuration every node follows: changes live on
//! every node, the same backend through every node, concurrent writers.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    fleet::{Fleet, NODES},
    routed::VIP4,
    traffic::{moved, udp_picks},
};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// (a) a change written to etcd is live on every node within a second, with equal digests;
/// (b) 1,000 UDP flows meet the same backend whichever node receives them; a malformed value
/// in etcd is rejected for its key only; `lb cluster status` agrees.
#[test]
fn every_node_applies_each_revision_and_picks_the_same_backend() -> anyhow::Result<()> {
    let mut f = Fleet::new("fla")?;
    let tcp = format!("{VIP4}:80/tcp");
    let udp = format!("{VIP4}:80/udp");
    f.gue_vip(0, &tcp, &["10.41.0.2", "10.42.0.2"], &[])?;
    let (mut digest, _) = f.converged(&tcp, None)?;

    // A backend added in etcd itself (etcdctl, as a config pipeline would).
    let key = format!("/xdp-lb/t/vips/{tcp}");
    let value = r#"{"forward":"gue","backends":{"10.41.0.2":{},"10.42.0.2":{},"10.43.0.2":{}}}"#;
    let start = Instant::now();
    f.etcd.ctl(&["put", &key, value])?;
    let (d, _) = f.converged(&tcp, Some(&digest))?;
    let took = start.elapsed();
    println!("a backend added with etcdctl was live on all {NODES} nodes after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    digest = d;
    for k in 0..NODES {
        let v = f.vips(k)?;
        assert_eq!(v[0].backends.len(), 3, "node {k}: {v:?}");
    }

    // 20 changes through `lb` on alternating nodes: time to live everywhere.
    let mut times = Vec::new();
    for n in 0..20 {
        let w = (60 + n * 7).to_string();
        let start = Instant::now();
        f.lb(n % NODES, &["backend", "weight", &tcp, "10.43.0.2", &w])?;
        let (d, _) = f.converged(&tcp, Some(&digest))?;
        times.push(start.elapsed());
        digest = d;
    }
    let max = *times.iter().max().unwrap_or(&Duration::ZERO);
    println!(
        "20 changes: write to live on all nodes median {:?}, max {max:?}",
        median(times.clone())
    );
    assert!(max < Duration::from_secs(1), "{times:?}");

    // (b) the same backend whichever node: each node alone in the router's route in turn.
    // Second chance off for this VIP: the sample's UDP socket is unconnected, so with it on
    // a backend hands every datagram of a moved slot to the slot's previous backend, and the
    // answer would name that one instead of the load balancer's choice.
    f.gue_vip(
        1,
        &udp,
        &["10.41.0.2", "10.42.0.2", "10.43.0.2"],
        &["--second-chance", "0"],
    )?;
    f.converged(&udp, None)?;
    // Each node alone at the router: the other two drained, as an operator would.
    let seen: Vec<BTreeMap<u16, String>> =
        f.through_each(&format!("{VIP4}/32"), |_| udp_picks(&f.net.client))?;
    let differ = moved(&seen);
    let mut spread: BTreeMap<&str, usize> = BTreeMap::new();
    for b in seen[0].values() {
        *spread.entry(b.as_str()).or_default() += 1;
    }
    println!(
        "1000 UDP flows through each node alone: {differ} met a different backend; spread {spread:?}"
    );
    assert_eq!(differ, 0);
    assert_eq!(spread.len(), 3, "{spread:?}");

    fleet_deny(&mut f)?;

    // A malformed value is rejected for its key only: the VIP keeps its last good value, the
    // other VIPs still change, and every node says so.
    f.etcd.ctl(&[
        "put",
        &key,
        r#"{"forward":"gue","backends":{"10.41.0.2":{"weight":70000}}}"#,
    ])?;
    f.lb(2, &["backend", "weight", &udp, "10.41.0.2", "55"])?;
    for k in 0..NODES {
        let s = f.stats(k)?;
        let store = s.store.context("store view")?;
        assert!(store.connected, "node {k}: {store:?}");
        assert_eq!(store.rejected.len(), 1, "node {k}: {store:?}");
        assert!(store.rejected[0].contains("70000"), "{store:?}");
        assert_eq!(store.rejected_total, 1, "node {k}: {store:?}");
        let v = f.vips(k)?;
        let t = v
            .iter()
            .find(|v| v.vip.to_string() == tcp)
            .context("tcp vip")?;
        assert_eq!(t.backends.len(), 3, "node {k} kept the last good value");
        let u = v
            .iter()
            .find(|v| v.vip.to_string() == udp)
            .context("udp vip")?;
        assert_eq!(u.backends[0].weight, 55, "node {k} applied the other key");
    }
    let text = f.lb(0, &["stats"])?;
    assert!(text.contains("WARNING: store key not applied"), "{text}");
    println!("{}", text.lines().take(3).collect::<Vec<_>>().join("\n"));

    // Every node publishes its status right after applying a revision.
    let start = Instant::now();
    let c = loop {
        let c = f.cluster(1)?;
        if c.nodes.len() == NODES && c.divergence.is_empty() {
            break c;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(3), "{c:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(c.nodes.iter().all(|n| n.revision == c.revision), "{c:?}");
    // The same in Prometheus terms, on every node.
    let tcp_digest = f.digests(&tcp)?[0].clone().context("digest")?;
    for k in 0..NODES {
        let m = f.metrics(k)?;
        for want in [
            "lb_store_connected 1".to_string(),
            "lb_store_rejected_values_total 1".to_string(),
            format!("lb_store_applied_revision {}", c.revision),
            format!("lb_vip_ring_digest{{vip=\"{tcp}\",digest=\"{tcp_digest}\"}} 1"),
        ] {
            assert!(m.contains(&want), "node {k} metrics lack `{want}`:\n{m}");
        }
    }
    println!("{}", f.lb(1, &["cluster", "status"])?);
    Ok(())
}

/// (c) The fleet's deny list: a bulk `lb deny add --file` holding the client, cut off by
/// etcd's death and run again, is on every node ([`super::bulk_deny::bulk_deny`]), and the
/// client's new connections are dropped whichever node receives them; `lb deny add` on node
/// 1 is in etcd and on every node; `lb deny remove` on node 2 lets them through every node
/// again; an entry with an end leaves etcd (its lease) and every node's list by itself.
fn fleet_deny(f: &mut Fleet) -> anyhow::Result<()> {
    let target = std::net::SocketAddr::new(VIP4.parse()?, 80);
    let client = format!("{}/32", lb_tests::routed::CLIENT4);
    super::bulk_deny::bulk_deny(f, &client)?;
    let listed =
        |k: usize, p: &str| -> anyhow::Result<bool> { Ok(f.lb(k, &["deny", "list"])?.contains(p)) };
    let start = Instant::now();
    f.lb(1, &["deny", "add", &client])?;
    f.lb(0, &["deny", "add", "198.51.100.0/24", "--expires", "2"])?;
    for k in 0..NODES {
        lb_tests::wait_until(
            Duration::from_secs(5),
            &format!("node {k} lists the client's deny"),
            || listed(k, &client),
            String::new,
        )?;
    }
    println!(
        "a deny added on node 1 was on all {NODES} nodes after {:?}",
        start.elapsed()
    );
    let connect = || {
        f.net
            .client
            .run(|| std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)))
    };
    let prefix = format!("{VIP4}/32");
    // Dropped, not refused: only a timeout counts (a reset or a broken namespace does not).
    f.through_each(&prefix, |k| match connect()? {
        Ok(_) => anyhow::bail!("a denied client connected through node {k}"),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
        Err(e) => anyhow::bail!("through node {k}: {e}, not the timeout of a dropped SYN"),
    })?;
    // The entry with an end: its lease deletes the key, and every node lets it go.
    lb_tests::wait_until(
        Duration::from_secs(10),
        "the ended entry gone from etcd and every node",
        || {
            let keys = f
                .etcd
                .ctl(&["get", "--prefix", "--keys-only", "/xdp-lb/t/deny/"])?;
            Ok(!keys.contains("198.51.100.0")
                && (0..NODES).try_fold(true, |all, k| {
                    Ok::<_, anyhow::Error>(all && !listed(k, "198.51.100.0/24")?)
                })?)
        },
        || format!("{:?}", f.etcd.ctl(&["get", "--prefix", "/xdp-lb/t/deny/"])),
    )?;
    f.lb(2, &["deny", "remove", &client])?;
    for k in 0..NODES {
        lb_tests::wait_until(
            Duration::from_secs(5),
            &format!("node {k} dropped the client's deny"),
            || Ok(!listed(k, &client)?),
            String::new,
        )?;
    }
    f.through_each(&prefix, |k| {
        f.net
            .client
            .run(|| lb_tests::traffic::one_request(target))?
            .with_context(|| format!("the client through node {k} after the removal"))
    })?;
    println!("denied through every node, served through every node after the removal");
    Ok(())
}

/// (e) Two operators at once: edits on different nodes both land (retried on a conflict);
/// two `apply` runs planned at the same revision: one applies, the other is refused with a
/// conflict, never a lost update.
#[test]
fn concurrent_changes_from_different_nodes_are_never_lost() -> anyhow::Result<()> {
    let f = Fleet::new("fle")?;
    let vip = format!("{VIP4}:81/tcp");
    f.gue_vip(0, &vip, &[], &[])?;
    // The agents' sockets: the threads run `lb` against them as separate operators.
    let sockets: Vec<std::path::PathBuf> = (0..NODES).map(|k| f.net.dir_at(k).socket()).collect();
    let mut workers = Vec::new();
    for (k, socket) in sockets.iter().enumerate().skip(1) {
        let (socket, vip) = (socket.clone(), vip.clone());
        workers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            for n in 1..=10 {
                let a = format!("10.9{k}.0.{n}");
                let out = lb(&socket, &["backend", "add", &vip, &a])?;
                anyhow::ensure!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        }));
    }
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    // Each node follows the store: the writers' last changes reach the third node within a
    // watch event, which under load can come after both writers have their answers.
    for k in 0..NODES {
        lb_tests::wait_until(
            std::time::Duration::from_secs(10),
            &format!("node {k} has every backend both operators added"),
            || Ok(f.vips(k)?[0].backends.len() == 20),
            || format!("{:?}", f.vips(k).map(|v| v[0].backends.len())),
        )?;
        let n = f.vips(k)?[0].backends.len();
        assert_eq!(n, 20, "node {k} has every backend both operators added");
    }

    // A value written with another tool (etcdctl: no `meta` bump) between a writer's read
    // and its commit: the commit is refused, the other tool's value stays.
    let keys = || lb_userspace::fleet::schema::Keys::new("t").map_err(anyhow::Error::msg);
    let config = lb_userspace::fleet::FleetConfig::new(
        &format!("etcd://10.30.0.1:{}", lb_tests::etcd::PORT),
        &Default::default(),
        "t",
        "x",
    )
    .map_err(anyhow::Error::msg)?;
    let store_call = |commit: Option<lb_userspace::fleet::store::Snapshot>| {
        let config = config.clone();
        f.net.router.run(
            move || -> anyhow::Result<(lb_userspace::fleet::store::Snapshot, Option<i64>)> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let store =
                        lb_userspace::fleet::store::Store::connect(&config, keys()?).await?;
                    match commit {
                        None => Ok((store.snapshot(None).await?, None)),
                        Some(snap) => {
                            let w = lb_userspace::fleet::schema::Write::Put {
                                key: format!("/xdp-lb/t/vips/{VIP4}:82/tcp"),
                                value: b"{}".to_vec(),
                            };
                            let r = store.commit(&snap, &[w]).await?;
                            Ok((snap, r))
                        }
                    }
                })
            },
        )?
    };
    let (snap, _) = store_call(None)?;
    f.etcd.ctl(&[
        "put",
        &format!("/xdp-lb/t/vips/{vip}"),
        r#"{"forward":"gue"}"#,
    ])?;
    let (_, committed) = store_call(Some(snap))?;
    assert_eq!(
        committed, None,
        "a commit over another tool's newer write is refused"
    );
    let start = Instant::now();
    while !f.vips(0)?[0].backends.is_empty() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(3),
            "etcdctl's value not applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The control: the same commit from a fresh read goes through.
    let (fresh, _) = store_call(None)?;
    let (_, committed) = store_call(Some(fresh))?;
    assert!(
        committed.is_some(),
        "a commit from a fresh read is accepted"
    );
    f.lb(0, &["vip", "remove", &format!("{VIP4}:82/tcp")])?;
    println!("a commit over etcdctl's newer value: refused (the same from a fresh read: accepted)");

    let dir = tempdir()?;
    let a = dir.join("a.toml");
    let b = dir.join("b.toml");
    let config = |backend: &str| {
        format!(
            "[[vip]]\naddress = \"{vip}\"\nforward = \"gue\"\nbackend = [ {{ address = \"{backend}\" }} ]\n"
        )
    };
    std::fs::write(&a, config("10.41.0.2"))?;
    std::fs::write(&b, config("10.42.0.2"))?;
    let plan = f.lb(1, &["apply", "-f", path(&a)?, "--dry-run"])?;
    let rev = plan
        .split("--if-revision ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .with_context(|| format!("no revision in the dry run: {plan}"))?
        .to_string();
    let mut runs = Vec::new();
    for (k, file) in [(1, a.clone()), (2, b.clone())] {
        let (socket, rev) = (sockets[k].clone(), rev.clone());
        runs.push(std::thread::spawn(move || {
            lb(
                &socket,
                &[
                    "apply",
                    "-f",
                    file.to_str().unwrap_or(""),
                    "--if-revision",
                    &rev,
                ],
            )
        }));
    }
    let outs: Vec<std::process::Output> = runs
        .into_iter()
        .map(|r| r.join().map_err(|_| anyhow::anyhow!("apply panicked"))?)
        .collect::<anyhow::Result<_>>()?;
    let ok: Vec<bool> = outs.iter().map(|o| o.status.success()).collect();
    assert_eq!(
        ok.iter().filter(|x| **x).count(),
        1,
        "exactly one applies: {outs:?}"
    );
    let refused = outs
        .iter()
        .find(|o| !o.status.success())
        .context("refused")?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(4), "conflict exit code: {err}");
    // Refused either before writing (the revision moved) or by etcd's compare (both read the
    // same revision and the other's transaction landed first).
    assert!(
        err.contains("as planned") || err.contains("changed while this apply was planned"),
        "{err}"
    );
    println!(
        "concurrent applies: one applied, the other refused: {}",
        err.trim()
    );
    let winner = if ok[0] { "10.41.0.2" } else { "10.42.0.2" };
    for k in 0..NODES {
        let v = f.vips(k)?;
        let addrs: Vec<String> = v[0]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(addrs, [winner], "node {k}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `lb --socket SOCKET ARGS`.
fn lb(socket: &std::path::Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(std::process::Command::new(lb_tests::lb_binary()?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()?)
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(lb_tests::unique_name("fle"));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn path(p: &std::path::Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
