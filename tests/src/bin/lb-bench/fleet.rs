//! The fleet's control plane: time from a configuration write to the new slot table being
//! live on all three nodes (each node's `vip list` shows the same new digest), over 20
//! changes, against the etcd write alone measured in the same run.
use std::time::{Duration, Instant};

use lb_tests::{fleet::Fleet, routed::VIP4};

fn median_max(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(v[v.len() / 2]), ms(v[v.len() - 1]))
}

pub fn fleet_rows() -> anyhow::Result<()> {
    const CHANGES: usize = 20;
    let f = Fleet::new("bfl")?;
    let vip = format!("{VIP4}:80/tcp");
    f.lb(0, &["vip", "add", &vip, "--forward", "gue"])?;
    for b in ["10.41.0.2", "10.42.0.2", "10.43.0.2"] {
        f.lb(0, &["backend", "add", &vip, b])?;
    }
    let (mut digest, _) = f.converged(&vip, None)?;
    let key = format!("/xdp-lb/t/vips/{vip}");
    let mut floor = Vec::new();
    let mut by_etcdctl = Vec::new();
    let mut by_lb = Vec::new();
    for n in 0..CHANGES {
        // The floor: an etcd write of a key nobody watches.
        let t = Instant::now();
        f.etcd.ctl(&["put", "/bench/floor", &n.to_string()])?;
        floor.push(t.elapsed());
        // A value written straight into etcd (a config pipeline).
        let w = 110 + n;
        let value = format!(
            r#"{{"forward":"gue","backends":{{"10.41.0.2":{{"weight":{w}}},"10.42.0.2":{{}},"10.43.0.2":{{}}}}}}"#
        );
        let t = Instant::now();
        f.etcd.ctl(&["put", &key, &value])?;
        let (d, _) = f.converged(&vip, Some(&digest))?;
        by_etcdctl.push(t.elapsed());
        digest = d;
        // `lb backend weight` on one node (written to etcd with compare-on-revision).
        let t = Instant::now();
        f.lb(
            n % 3,
            &[
                "backend",
                "weight",
                &vip,
                "10.42.0.2",
                &(50 + n).to_string(),
            ],
        )?;
        let (d, _) = f.converged(&vip, Some(&digest))?;
        by_lb.push(t.elapsed());
        digest = d;
    }
    let (fm, fx) = median_max(floor);
    println!(
        "| Fleet: write to live on all 3 nodes ({CHANGES} changes) | median ms | max ms | median / floor |"
    );
    println!("| --- | ---: | ---: | ---: |");
    println!("| floor: `etcdctl put` of an unwatched key | {fm:.1} | {fx:.1} | 1.0x |");
    for (label, v) in [
        (
            "`etcdctl put` of a VIP key, until every node's digest changed",
            by_etcdctl,
        ),
        (
            "`lb backend weight` on a node, until every node's digest changed",
            by_lb,
        ),
    ] {
        let (m, x) = median_max(v);
        println!("| {label} | {m:.1} | {x:.1} | {:.1}x |", m / fm);
    }
    println!();
    println!("Both include polling every node's `lb vip list` (about 10 ms a round).");
    Ok(())
}
