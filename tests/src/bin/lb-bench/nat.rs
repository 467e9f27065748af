//! NAT rows: an established connection's packet each way through `lb_xdp` and the
//! tail-called `lb_nat`. The program rewrites the frame it is given, so a repeated run would
//! measure a different packet from the second pass on: these are single runs (a fresh frame
//! each), against the floor measured the same way.
use lb_tests::{routed::FibNs, world::World};

use super::{Row, row, tcp};
use crate::encap::ns_single_on;

pub fn nat_rows() -> anyhow::Result<Vec<Row>> {
    const N: u32 = 100_000;
    let fib = FibNs::new()?;
    fib.ns
        .ip(&["route", "add", "192.0.2.0/24", "via", "10.31.0.1"])?;
    let mut world = World::new()?;
    let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("literal") };
    for id in [1, 2, 3] {
        world.set_backend_nat(id, ip("10.41.0.2"), 8000, ip("10.31.0.2"))?;
    }
    fib.ns.run(|| -> anyhow::Result<Vec<Row>> {
        let request = tcp([192, 0, 2, 7], 40000, [10, 0, 0, 10], 80);
        let floor = ns_single_on(world.dp.pass_program()?, N, &request, fib.ifindex)?;
        // The connection opens with a handshake (only a SYN takes a NAT port): SYN at
        // sequence number 999, SYN-ACK at 0, then the measured frames (1000, ACK 1)
        // establish it and stay in its window.
        let mut syn = Vec::new();
        lb_tests::world::SCENE
            .eth()
            .ipv4([192, 0, 2, 7], [10, 0, 0, 10], 64)
            .tcp(40000, 80, 999, 64000)
            .syn()
            .write(&mut syn, &[])?;
        let (_, out) = world.run_on(&syn, fib.ifindex)?;
        let nat_port = u16::from_be_bytes([out[34], out[35]]);
        let mut synack = Vec::new();
        lb_tests::world::SCENE
            .eth()
            .ipv4([10, 41, 0, 2], [10, 31, 0, 2], 64)
            .tcp(8000, nat_port, 0, 64000)
            .syn()
            .ack(1000)
            .write(&mut synack, &[])?;
        world.run_on(&synack, fib.ifindex)?;
        let (action, _) = world.run_on(&request, fib.ifindex)?;
        anyhow::ensure!(
            action == 3,
            "the handshake's ACK was not forwarded: {action}"
        );
        let answer = tcp([10, 41, 0, 2], 8000, [10, 31, 0, 2], nat_port);
        let fwd = ns_single_on(world.dp.lb_program()?, N, &request, fib.ifindex)?;
        let rev = ns_single_on(world.dp.lb_program()?, N, &answer, fib.ifindex)?;
        Ok(vec![
            row(
                format!("XDP_PASS floor ({N} single runs, NAT namespace)"),
                floor,
                floor,
                None,
            ),
            row(
                "established NAT connection, client -> backend (single runs)".into(),
                fwd,
                floor,
                None,
            ),
            row(
                "established NAT connection, backend -> client (single runs)".into(),
                rev,
                floor,
                None,
            ),
        ])
    })?
}
