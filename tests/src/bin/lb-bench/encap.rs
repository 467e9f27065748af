//! Rows for `--flow-table off` and for encapsulation (the load balancer's ipip/gue paths and
//! the backends' decap program).
use anyhow::Context as _;
use aya::programs::Xdp;
use lb_common::{ENCAP_GUE, ENCAP_IPIP};
use lb_tests::{routed::FibNs, world::World};

use super::{
    NEW_FLOWS, REPEAT, Row, client, median_of_three, ns_new_flows, ns_repeat, ns_single, row, tcp,
};

/// Mean kernel-reported ns of `n` single runs of `frame` received on `ifindex`.
pub(super) fn ns_single_on(prog: &Xdp, n: u32, frame: &[u8], ifindex: u32) -> anyhow::Result<f64> {
    ns_single(prog, n, Some(ifindex), |_| frame.to_vec())
}

/// `--flow-table off`: every packet costs the VIP lookup, a hash and a slot read, whether its
/// flow is new or not (the new-flow harness gives every pass a new flow).
pub fn stateless_rows() -> anyhow::Result<Vec<Row>> {
    let mut world = World::stateless()?;
    let frame = tcp([192, 0, 2, 7], 40000, [10, 0, 0, 10], 80);
    let floor = ns_repeat(world.dp.pass_program()?, &frame, REPEAT)?;
    let harness = ns_repeat(world.dp.extra_program("bench_next_client")?, &frame, REPEAT)?;
    let parse = ns_repeat(world.dp.extra_program("bench_parse")?, &frame, REPEAT)?;
    let place = ns_repeat(world.dp.extra_program("bench_place")?, &frame, REPEAT)?;
    let same = ns_repeat(world.dp.lb_program()?, &frame, REPEAT)?;
    let new = ns_new_flows(world.dp.extra_program("bench_lb_new_flow")?, REPEAT)?;
    // New flows as the flow-table rows measure them too: distinct frames, one run each.
    let single_frame = |i| {
        let (c, p) = client(i);
        tcp(c, p, [10, 0, 0, 10], 80)
    };
    let floor_single = ns_single(world.dp.pass_program()?, NEW_FLOWS, None, single_frame)?;
    let new_single = ns_single(world.dp.lb_program()?, NEW_FLOWS, None, single_frame)?;
    Ok(vec![
        row(
            format!("XDP_PASS floor (repeat {REPEAT}, flow table off)"),
            floor,
            floor,
            None,
        ),
        row(
            "  of which: parsing (+ VIP-address bitmap)".into(),
            parse,
            floor,
            None,
        ),
        row(
            "  of which: parsing + placement (VIP, hash, slot, backend)".into(),
            place,
            floor,
            None,
        ),
        row(
            "TCP packet of a known flow, flow table off".into(),
            same,
            floor,
            Some(2.0),
        ),
        row(
            "new TCP flow, flow table off (harness included)".into(),
            new,
            floor,
            Some(2.0),
        ),
        row(
            "new TCP flow, flow table off, harness subtracted".into(),
            new - (harness - floor),
            floor,
            Some(2.0),
        ),
        row(
            format!("XDP_PASS floor ({NEW_FLOWS} single runs, flow table off)"),
            floor_single,
            floor_single,
            None,
        ),
        row(
            format!("new TCP flow, flow table off ({NEW_FLOWS} single runs)"),
            new_single,
            floor_single,
            Some(2.0),
        ),
    ])
}

/// Median of three runs of `REPEAT` passes over `frame` received on `ifindex`.
pub(super) fn ns_repeat_on(prog: &Xdp, frame: &[u8], ifindex: u32) -> anyhow::Result<f64> {
    median_of_three(prog, REPEAT, Some(ifindex), |_| frame.to_vec())
}

/// Encapsulating modes and the backends' decap program, in a namespace whose FIB knows the
/// next hop. Both change the frame's shape, so repeated runs go through harnesses that put the
/// frame back after each pass (their restore is included: these ratios are upper bounds), and
/// single runs (a fresh frame each, cold caches) are shown against the floor measured the same
/// way.
pub fn encap_rows() -> anyhow::Result<Vec<Row>> {
    const N: u32 = 100_000;
    let fib = FibNs::new()?;
    let mut world = World::new()?;
    let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("literal") };
    let local = [ip("10.41.0.2")].into_iter().collect();
    let vips = [ip("10.0.0.10")].into_iter().collect();
    let mut decap = lb_userspace::decap::load_from(
        lb_tests::world::decap_object(),
        lb_common::DEFAULT_GUE_PORT,
        &local,
        None,
    )?;
    lb_userspace::decap::set_vips(&mut decap, &vips)?;
    lb_tests::routed::trust_routed(&mut decap)?;
    fib.ns.run(|| -> anyhow::Result<Vec<Row>> {
        let frame = tcp([192, 0, 2, 7], 40000, [10, 0, 0, 10], 80);
        let floor_r = ns_repeat_on(world.dp.pass_program()?, &frame, fib.ifindex)?;
        let floor = ns_single_on(world.dp.pass_program()?, N, &frame, fib.ifindex)?;
        let mut rows = vec![row(
            format!("XDP_PASS floor (repeat {REPEAT}, encapsulation namespace)"),
            floor_r,
            floor_r,
            None,
        )];
        let mut singles = vec![row(
            format!("XDP_PASS floor ({N} single runs, encapsulation namespace)"),
            floor,
            floor,
            None,
        )];
        world.run_on(&frame, fib.ifindex)?;
        world.run_on(&frame, fib.ifindex)?;
        let l2_r = ns_repeat_on(world.dp.lb_program()?, &frame, fib.ifindex)?;
        rows.push(row("established TCP flow, l2".into(), l2_r, floor_r, Some(2.0)));
        // The restoring harness on the l2 path (nothing to undo): its own cost, to read the
        // encapsulation rows against.
        let harness = ns_repeat_on(
            world.dp.extra_program("bench_lb_encap")?,
            &frame,
            fib.ifindex,
        )?;
        rows.push(row(
            "established TCP flow, l2, through the restoring harness".into(),
            harness,
            floor_r,
            None,
        ));
        let l2 = ns_single_on(world.dp.lb_program()?, N, &frame, fib.ifindex)?;
        singles.push(row(
            "established TCP flow, l2 (single runs)".into(),
            l2,
            floor,
            None,
        ));
        for (name, encap) in [("ipip", ENCAP_IPIP), ("gue", ENCAP_GUE)] {
            for id in [1, 2, 3] {
                world.set_backend_encap(id, ip("10.41.0.2"), encap, ip("10.31.0.2"))?;
            }
            // Established first (probation, then the table), as in the l2 row.
            let (_, encapsulated) = world.run_on(&frame, fib.ifindex)?;
            world.run_on(&frame, fib.ifindex)?;
            let r = ns_repeat_on(
                world.dp.extra_program("bench_lb_encap")?,
                &frame,
                fib.ifindex,
            )?;
            rows.push(row(
                format!("established TCP flow, {name} (cached next hop + outer header; restore included)"),
                r,
                floor_r,
                Some(2.5),
            ));
            let d = ns_repeat_on(decap_bench(&mut decap)?, &encapsulated, fib.ifindex)?;
            rows.push(row(
                format!("backend decap program, {name} packet (restore included)"),
                d,
                floor_r,
                Some(1.5),
            ));
            let ns = ns_single_on(world.dp.lb_program()?, N, &frame, fib.ifindex)?;
            singles.push(row(
                format!("established TCP flow, {name} (single runs)"),
                ns,
                floor,
                Some(2.5),
            ));
            let d = ns_single_on(
                lb_userspace::decap::program(&mut decap)?,
                N,
                &encapsulated,
                fib.ifindex,
            )?;
            singles.push(row(
                format!("backend decap program, {name} packet (single runs)"),
                d,
                floor,
                Some(1.5),
            ));
        }
        rows.extend(singles);
        Ok(rows)
    })?
}

/// The decap object's benchmark harness, loaded.
pub(super) fn decap_bench(ebpf: &mut aya::Ebpf) -> anyhow::Result<&mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut("bench_decap")
        .context("no bench_decap program")?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    Ok(prog)
}
