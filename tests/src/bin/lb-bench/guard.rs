//! The guard's rows (`BENCH_ONLY=guard`): an established flow's packet and a SYN (placed,
//! never remembered, so every pass is a placement) to a VIP without a guard, with an allow
//! list of 10 prefixes and of 1,000,000, and with a node-wide deny list of 1,000,000 that
//! does not hold the client, and with a VIP and a source new-flow limit that no pass reaches;
//! each beside the floor and as a ratio to the no-guard row of the
//! same kind in the same run. Also the time the agent's writer takes to put 1,000,000
//! prefixes in a trie (batched).
use std::time::Instant;

use lb_common::{SCOPE_NODE, VIP_F_ALLOW, VIP_F_NODE_DENY};
use lb_tests::world::{SCENE, World};
use lb_userspace::{agent::guard::SourceRule, model::Prefix};

use super::{REPEAT, ns_repeat};

const MILLION: u32 = 1_000_000;

/// `n` distinct /32 prefixes in 100.64.0.0/10 and up, none holding the bench client.
fn many(deny: bool, scope: u32, n: u32) -> Vec<(SourceRule, u64)> {
    (0..n)
        .map(|i| {
            let a = 0x6440_0000u32 + i;
            let prefix = Prefix {
                addr: std::net::Ipv4Addr::from(a).into(),
                len: 32,
            };
            (
                SourceRule {
                    deny,
                    scope,
                    prefix,
                },
                0,
            )
        })
        .collect()
}

fn client_prefix() -> Vec<(SourceRule, u64)> {
    let prefix: Prefix = "192.0.2.0/24".parse().expect("literal");
    vec![(
        SourceRule {
            deny: false,
            scope: 0,
            prefix,
        },
        0,
    )]
}

pub fn guard_rows() -> anyhow::Result<()> {
    let established = SCENE.tcp4(
        ([192, 0, 2, 7], 40000),
        ([10, 0, 0, 10], 80),
        "A",
        &[0u8; 64],
    );
    let syn = SCENE.tcp4(([192, 0, 2, 8], 40001), ([10, 0, 0, 10], 80), "S", b"");
    let mut rows: Vec<(String, f64)> = Vec::new();
    let mut measure = |world: &mut World, label: &str| -> anyhow::Result<()> {
        // The flow established (probation, then the table), then timed.
        for _ in 0..3 {
            world.run(&established)?;
        }
        let prog = world.dp.lb_program()?;
        rows.push((
            format!("established, {label}"),
            ns_repeat(prog, &established, REPEAT)?,
        ));
        rows.push((format!("SYN, {label}"), ns_repeat(prog, &syn, REPEAT)?));
        Ok(())
    };
    let mut world = World::new()?;
    let floor = ns_repeat(world.dp.pass_program()?, &established, REPEAT)?;
    measure(&mut world, "no guard")?;

    let mut ten = many(false, 0, 9);
    ten.extend(client_prefix());
    world.dp.guard().write(&ten)?;
    world.set_vip_flags(0, VIP_F_ALLOW)?;
    measure(&mut world, "allow list of 10")?;

    let mut world = World::new()?;
    let mut big = many(false, 0, MILLION - 1);
    big.extend(client_prefix());
    let t = Instant::now();
    world.dp.guard().write(&big)?;
    let wrote = t.elapsed();
    world.set_vip_flags(0, VIP_F_ALLOW)?;
    measure(&mut world, "allow list of 1,000,000")?;

    let mut world = World::new()?;
    world.dp.guard().write(&many(true, SCOPE_NODE, MILLION))?;
    world.set_vip_flags(0, VIP_F_NODE_DENY)?;
    measure(&mut world, "node deny list of 1,000,000 (client not on it)")?;

    // Limits a pass never reaches (an interval of 1 ns, shorter than a pass), so every SYN is
    // placed: the rows price the check, not the drop. Established packets never meet it.
    let mut world = World::new()?;
    let (interval_ns, tolerance_ns) = lb_common::VipRate::params(u32::MAX, u32::MAX);
    world.dp.guard().set_rate(
        0,
        &lb_common::VipRate {
            interval_ns,
            tolerance_ns,
            source_interval_ns: interval_ns,
            source_tolerance_ns: tolerance_ns,
            tat: 0,
        },
    )?;
    world.set_vip_flags(0, lb_common::VIP_F_RATE)?;
    measure(&mut world, "new-flow and source limits (never reached)")?;

    println!("| case | ns/packet | x floor | x no guard |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| XDP_PASS floor | {floor:.1} | 1.00 | - |");
    let base = |kind: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(kind) && n.ends_with("no guard"))
            .map_or(f64::NAN, |(_, ns)| *ns)
    };
    for (name, ns) in &rows {
        let kind = name.split(',').next().unwrap_or_default();
        println!(
            "| {name} | {ns:.1} | {:.2} | {:.2} |",
            ns / floor,
            ns / base(kind)
        );
    }
    println!();
    println!(
        "1,000,000 prefixes written to a trie by the agent's writer (batched): {:.0} ms",
        wrote.as_secs_f64() * 1e3
    );
    Ok(())
}
