//! Whoever can write etcd, as an attacker would, with `etcdctl` and no `lb`: fake node
//! statuses (no lease, a lease that outlives its writer, named for another node, stale, a name
//! with terminal escape sequences), a VIP for all ports on a node's own address and one
//! outside the nodes' VIP pools, deny entries that would cut every client off (a field `lb`
//! never writes, host bits set). None is taken; each is counted and listed with its reason;
//! `lb cluster status` shows the escaped name and sends no escape byte; the node's own TCP
//! service stays reachable and neither hostile address is announced to the router by BGP;
//! fake votes do not take a backend down (while real-looking ones,
//! leased, named and fresh, would: the control).
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_tests::{
    bgp::next_hops,
    fleet::{Fleet, NODES},
    routed::VIP4,
};
use lb_userspace::{
    api::protocol::NodeStatus,
    model::{BackendAddr, VipAddr},
};

const B3: &str = "10.43.0.2";
/// Node 0's own address (its eth0, the preferred source of its routes), inside the pools.
const NODE0: &str = "10.30.0.2";
const EVIL: &str = "\x1b[31mevil\x1b[0m";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A status of node `name` whose probes say backend 3 is down.
fn down_vote(name: &str, vip: &str, at_unix: u64) -> anyhow::Result<String> {
    let status = NodeStatus {
        node: name.into(),
        revision: 1,
        health: BTreeMap::from([(
            vip.parse::<VipAddr>().map_err(anyhow::Error::msg)?,
            BTreeMap::from([(
                B3.parse::<BackendAddr>().map_err(anyhow::Error::msg)?,
                false,
            )]),
        )]),
        at_unix,
        ..NodeStatus::default()
    };
    Ok(serde_json::to_string(&status)?)
}

/// `etcdctl lease grant TTL`: the lease's id (hex).
fn grant(f: &Fleet, ttl: u32) -> anyhow::Result<String> {
    let out = f.etcd.ctl(&["lease", "grant", &ttl.to_string()])?;
    out.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("lease grant said {out:?}"))
}

fn put(f: &Fleet, key: &str, value: &str, lease: Option<&str>) -> anyhow::Result<()> {
    let lease = lease.map(|l| format!("--lease={l}"));
    let mut args = vec!["put"];
    args.extend(lease.as_deref());
    args.extend([key, value]);
    f.etcd.ctl(&args).map(drop)
}

/// Backend 3's health column and digest on every node stay as `want` for `period`, the
/// short leases kept alive meanwhile; returns the first difference.
fn holds(
    f: &Fleet,
    vip: &str,
    want: (&str, &str),
    period: Duration,
    keep: &[&str],
) -> anyhow::Result<Option<String>> {
    let start = Instant::now();
    while start.elapsed() < period {
        for l in keep {
            f.etcd.ctl(&["lease", "keep-alive", "--once", l])?;
        }
        let d = f.digests(vip)?;
        for (k, d) in d.iter().enumerate() {
            let v = f.vips(k)?;
            let h = v
                .iter()
                .find(|v| v.vip.to_string() == vip)
                .and_then(|v| v.backends.iter().find(|b| b.address.to_string() == B3))
                .map(|b| b.health.clone());
            if d.as_deref() != Some(want.1) || h.as_deref() != Some(want.0) {
                return Ok(Some(format!(
                    "node {k} after {:?}: health {h:?}, digest {d:?}",
                    start.elapsed()
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(None)
}

/// A TCP connection from the client's namespace to a listener on node 0's own address
/// (SSH-like) carries a byte each way.
fn own_service_answers(f: &Fleet) -> anyhow::Result<()> {
    let to: SocketAddr = format!("{NODE0}:2222").parse()?;
    let listener = f.net.lb.run(|| TcpListener::bind(to))??;
    let mut c = f
        .net
        .client
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))??;
    // The handshake is done: the connection waits in the backlog.
    let (mut s, _) = listener.accept()?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"SSH-2.0\n")?;
    let mut got = [0u8; 8];
    c.read_exact(&mut got)?;
    anyhow::ensure!(&got == b"SSH-2.0\n", "{got:?}");
    Ok(())
}

#[test]
fn nothing_from_the_store_is_taken_on_trust() -> anyhow::Result<()> {
    let f = Fleet::new("fhs")?;
    let vip = format!("{VIP4}:80/tcp");
    f.gue_vip(
        0,
        &vip,
        &["10.41.0.2", "10.42.0.2", B3],
        &[
            "--health",
            "tcp",
            "--interval-ms",
            "200",
            "--timeout-ms",
            "150",
        ],
    )?;
    let (all_up, _) = f.converged(&vip, None)?;
    own_service_answers(&f)?;
    let mut failed: Vec<String> = Vec::new();

    // The control: four statuses that look like nodes' (leased for 5 s, named as their key,
    // fresh) out-vote the three real nodes and take backend 3 down everywhere.
    let short = grant(&f, 5)?;
    let posers: Vec<String> = (0..4).map(|i| format!("poser{i}")).collect();
    for p in &posers {
        let key = format!("/xdp-lb/t/nodes/{p}");
        put(&f, &key, &down_vote(p, &vip, now())?, Some(&short))?;
    }
    let down = holds(&f, &vip, ("up", &all_up), Duration::from_secs(5), &[&short])?;
    println!("control, four leased self-named statuses voting down: {down:?}");
    anyhow::ensure!(
        down.is_some(),
        "real-looking votes did not count: no control"
    );
    for p in &posers {
        f.etcd.ctl(&["del", &format!("/xdp-lb/t/nodes/{p}")])?;
    }
    lb_tests::wait_until(
        Duration::from_secs(10),
        "backend 3 back up after the control",
        || Ok(holds(&f, &vip, ("up", &all_up), Duration::from_millis(1), &[])?.is_none()),
        String::new,
    )?;
    let before = f.stats(0)?.store.unwrap_or_default();

    // Five fake statuses, each voting backend 3 down (five of eight would be a majority).
    let long = grant(&f, 3600)?;
    let fakes: [(&str, String, Option<&str>, &str); 5] = [
        (
            "nolease",
            down_vote("nolease", &vip, now())?,
            None,
            "not bound to a lease",
        ),
        (
            "longlease",
            down_vote("longlease", &vip, now())?,
            Some(&long),
            "granted for 3600 s",
        ),
        (
            "othername",
            down_vote("lb1", &vip, now())?,
            Some(&short),
            "names node `lb1`",
        ),
        (
            "stale",
            down_vote("stale", &vip, now() - 600)?,
            Some(&short),
            "written at",
        ),
        (
            EVIL,
            down_vote(EVIL, &vip, now())?,
            Some(&short),
            "invalid node name",
        ),
    ];
    for (name, value, lease, _) in &fakes {
        put(&f, &format!("/xdp-lb/t/nodes/{name}"), value, *lease)?;
    }
    // The hostile VIPs: all ports of node 0's own address, and one outside every pool.
    let value = r#"{"forward":"gue","backends":{"10.41.0.2":{}}}"#;
    let own_vip = format!("{NODE0}:*/tcp");
    let outside = "192.0.2.10:80/tcp";
    put(&f, &format!("/xdp-lb/t/vips/{own_vip}"), value, None)?;
    put(&f, &format!("/xdp-lb/t/vips/{outside}"), value, None)?;
    // Hostile deny entries: all of IPv4 with a field `lb` never writes, and a prefix with its
    // host bits set (either would cut every client off if taken).
    let bad_denies = [
        ("0.0.0.0/0", r#"{"end_unix":0,"evil":1}"#, "unknown field"),
        ("10.20.0.2/8", "{}", "host bits are set"),
    ];
    for (p, v, _) in &bad_denies {
        put(&f, &format!("/xdp-lb/t/deny/{p}"), v, None)?;
    }

    if let Some(d) = holds(&f, &vip, ("up", &all_up), Duration::from_secs(4), &[&short])? {
        failed.push(format!("fake votes took backend 3 down: {d}"));
    }
    let stats = f.stats(0)?.store.unwrap_or_default();
    for (name, _, _, why) in &fakes {
        let line = format!("/xdp-lb/t/nodes/{name}: ");
        if !stats
            .ignored_statuses
            .iter()
            .any(|l| l.starts_with(&line) && l.contains(why))
        {
            failed.push(format!(
                "status {name:?} not ignored for {why:?}: {:?}",
                stats.ignored_statuses
            ));
        }
    }
    for (v, why) in [
        (own_vip.as_str(), "this node's own address"),
        (outside, "outside this node's VIP pools"),
    ] {
        if !stats
            .rejected
            .iter()
            .any(|l| l.contains(v) && l.contains(why))
        {
            failed.push(format!(
                "VIP {v} not rejected for {why:?}: {:?}",
                stats.rejected
            ));
        }
    }
    for (p, _, why) in &bad_denies {
        if !stats
            .rejected
            .iter()
            .any(|l| l.contains(&format!("/deny/{p}: ")) && l.contains(why))
        {
            failed.push(format!(
                "deny entry {p} not rejected for {why:?}: {:?}",
                stats.rejected
            ));
        }
    }
    for k in 0..NODES {
        let list = f.lb(k, &["deny", "list", "--json"])?;
        if list.trim() != "[]" {
            failed.push(format!("node {k} took a hostile deny entry: {list}"));
        }
    }
    let names: Vec<String> = f.vips(0)?.iter().map(|v| v.vip.to_string()).collect();
    if names != [vip.clone()] {
        failed.push(format!("node 0 serves {names:?}"));
    }
    for k in 1..NODES {
        if f.vips(k)?.iter().any(|v| v.vip.to_string() == outside) {
            failed.push(format!("node {k} took {outside}"));
        }
    }
    // A change through a node is not refused for the hostile keys it does not touch: they
    // are left out of both sides of the change, not checked as VIPs it adds.
    let unrelated = "10.0.0.77:80/tcp";
    for args in [["vip", "add", unrelated], ["vip", "remove", unrelated]] {
        if let Err(e) = f.lb(0, &args) {
            failed.push(format!(
                "`lb {}` refused beside the hostile keys: {e:#}",
                args.join(" ")
            ));
        }
    }
    if let Err(e) = own_service_answers(&f) {
        failed.push(format!("node 0's own TCP service is unreachable: {e}"));
    }
    // Nor announced: every node announces the real VIP (the control), the router learned
    // no route to either hostile address.
    f.wait_route(&format!("{VIP4}/32"), &[0, 1, 2], Duration::from_secs(10))?;
    for addr in [NODE0, "192.0.2.10"] {
        let hops = next_hops(&f.net.router, &format!("{addr}/32"))?;
        if !hops.is_empty() {
            failed.push(format!("{addr} announced to the router via {hops:?}"));
        }
    }

    // Counted once each (and logged once: the same branch), not at every status round.
    std::thread::sleep(Duration::from_secs(2));
    let after = f.stats(0)?.store.unwrap_or_default();
    let ignored = after.ignored_statuses_total - before.ignored_statuses_total;
    let rejected = after.rejected_total - before.rejected_total;
    println!("node 0 counted {ignored} ignored statuses, {rejected} rejected values");
    if ignored != 5 || rejected != 4 {
        failed.push(format!(
            "counted {ignored} ignored statuses (want 5) and {rejected} rejected values (want 4)"
        ));
    }
    let metrics = f.metrics(0)?;
    let want = format!(
        "lb_store_ignored_statuses_total {}",
        after.ignored_statuses_total
    );
    if !metrics.lines().any(|l| l == want) {
        failed.push(format!("/metrics lacks {want:?}"));
    }

    // The operator's terminal gets the name escaped, never the escape byte.
    // (Node 0 must still reach etcd for this: a VIP on its own address would take etcd's
    // answers too.)
    match f.lb(0, &["cluster", "status"]) {
        Ok(text) => {
            println!("{text}");
            if text.contains('\x1b') || !text.contains("\\x1b[31mevil\\x1b[0m") {
                failed.push(format!("`lb cluster status` printed {text:?}"));
            }
        }
        Err(e) => failed.push(e.to_string()),
    }
    let stats_text = f.lb(0, &["stats"])?;
    if stats_text.contains('\x1b') || !stats_text.contains("\\x1b[31mevil") {
        failed.push(format!("`lb stats` printed {stats_text:?}"));
    }
    assert!(failed.is_empty(), "{failed:#?}");
    Ok(())
}
