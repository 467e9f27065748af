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
        // The connection is established by its first packet (a NAT port taken).
        let (_, out) = world.run_on(&request, fib.ifindex)?;
        let nat_port = u16::from_be_bytes([out[34], out[35]]);
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
