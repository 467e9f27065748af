//! Second chance on the backend: the decap program's paths for a packet that carries a hop
//! list, against a plain tunnel packet, in a namespace with a real listener and an
//! established connection (so the socket lookups find what they would on a backend).
use lb_tests::{
    routed::{FibNs, GW_MAC},
    second_chance::{CLIENT4, VIP4, gue_hop, outer, sockets},
    world::{SCENE, World, ip},
};

use super::{
    REPEAT, Row,
    encap::{decap_bench, ns_repeat_on, ns_single_on},
    row,
};

pub fn second_chance_rows() -> anyhow::Result<Vec<Row>> {
    const N: u32 = 100_000;
    let fib = FibNs::new()?;
    let socks = sockets(&fib.ns)?;
    let mut world = World::new()?;
    let local = [ip("10.41.0.2")].into_iter().collect();
    let vips = [ip(VIP4)].into_iter().collect();
    let mut decap = lb_userspace::decap::load_from(
        lb_tests::world::decap_object(),
        lb_common::DEFAULT_GUE_PORT,
        &local,
        None,
    )?;
    lb_userspace::decap::set_vips(&mut decap, &vips)?;
    lb_tests::routed::trust_routed(&mut decap)?;
    let v4 = |s: &str| lb_tests::frames::v4(s);
    let ack = |sport: u16| SCENE.tcp4((v4(CLIENT4), sport), (v4(VIP4), 80), "A", &[0u8; 64]);
    let lb = (ip("10.31.0.9"), ip("10.41.0.2"));
    let hop = gue_hop(true, ip("10.41.0.3"), 0);
    let frame = |gue: &[u8], inner: &[u8]| outer(fib.mac, GW_MAC, lb, 50000, 7, gue, &inner[14..]);
    let cases = [
        (
            "no hop list (plain strip)",
            frame(&[], &ack(socks.est4)),
            Some(1.5),
        ),
        (
            "hop list, established socket found: kept",
            frame(&hop, &ack(socks.est4)),
            Some(2.0),
        ),
        (
            "hop list, no socket: sent on to the next hop (FIB, XDP_TX)",
            frame(&hop, &ack(40404)),
            Some(3.0),
        ),
    ];
    fib.ns.run(|| -> anyhow::Result<Vec<Row>> {
        let plain = SCENE.tcp4((v4(CLIENT4), 40000), (v4(VIP4), 80), "A", &[0u8; 64]);
        let floor_r = ns_repeat_on(world.dp.pass_program()?, &plain, fib.ifindex)?;
        let floor = ns_single_on(world.dp.pass_program()?, N, &plain, fib.ifindex)?;
        let mut rows = vec![row(
            format!("XDP_PASS floor (repeat {REPEAT}, backend namespace)"),
            floor_r,
            floor_r,
            None,
        )];
        let mut singles = vec![row(
            format!("XDP_PASS floor ({N} single runs, backend namespace)"),
            floor,
            floor,
            None,
        )];
        for (name, f, target) in &cases {
            let r = ns_repeat_on(decap_bench(&mut decap)?, f, fib.ifindex)?;
            rows.push(row(
                format!("backend decap, {name} (restore included)"),
                r,
                floor_r,
                *target,
            ));
            let s = ns_single_on(lb_userspace::decap::program(&mut decap)?, N, f, fib.ifindex)?;
            singles.push(row(
                format!("backend decap, {name} (single runs)"),
                s,
                floor,
                *target,
            ));
        }
        rows.extend(singles);
        Ok(rows)
    })?
}
