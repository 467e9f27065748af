//! Instructions per path: each packet path of the benchmark run once through the instruction
//! counter (`lb_tests::insns`) and once through the kernel, which must agree on the action and
//! the output bytes.
use anyhow::Context as _;
use lb_tests::{
    insns::{PathCount, VERIFIER_LIMIT, count_cached, count_checked, verified_counts},
    world::{SCENE, World},
};

use super::tcp;

/// One path: its name, the frame, and what the kernel and the counter did with it.
struct Path {
    name: &'static str,
    count: PathCount,
}

/// Counts `frame` through `world`'s program, checked against the kernel's run.
fn count(world: &mut World, name: &'static str, frame: &[u8]) -> anyhow::Result<Path> {
    count_with(count_checked, world, name, frame)
}

/// As [`count`], with the counting function `f`.
fn count_with(
    f: fn(&mut World, &[u8]) -> anyhow::Result<PathCount>,
    world: &mut World,
    name: &'static str,
    frame: &[u8],
) -> anyhow::Result<Path> {
    let count = f(world, frame).with_context(|| format!("counting {name}"))?;
    if std::env::var_os("INSNS_TRACE").is_some() {
        let pcs: Vec<String> = count.trace.iter().map(u32::to_string).collect();
        eprintln!("trace {name}: {}", pcs.join(" "));
    }
    Ok(Path { name, count })
}

pub fn insn_rows() -> anyhow::Result<()> {
    let vip = [10, 0, 0, 10];
    let mut paths = Vec::new();
    let mut world = World::new()?;
    let established = tcp([192, 0, 2, 7], 40000, vip, 80);
    paths.push(count(
        &mut world,
        "non-VIP packet",
        &tcp([192, 0, 2, 7], 40000, [10, 0, 0, 99], 80),
    )?);
    paths.push(count(
        &mut world,
        "new TCP flow (first ACK, onto probation)",
        &established,
    )?);
    world.run(&established)?;
    paths.push(count_with(
        count_cached,
        &mut world,
        "established TCP flow (this CPU's flow cache)",
        &established,
    )?);
    let mut uncached = World::without_flow_cache()?;
    uncached.run(&established)?;
    uncached.run(&established)?;
    paths.push(count(
        &mut uncached,
        "established TCP flow, no flow cache (the flow table's lookup)",
        &established,
    )?);
    let syn = SCENE.tcp4(([192, 0, 2, 8], 40001), (vip, 80), "S", &[]);
    paths.push(count(&mut world, "SYN, placed and not remembered", &syn)?);
    let mut stateless = World::stateless()?;
    paths.push(count(
        &mut stateless,
        "any TCP packet, flow table off",
        &established,
    )?);
    println!(
        "| path (checked against the kernel's run) | BPF instructions | helper calls | map lookups |"
    );
    println!("| --- | ---: | --- | --- |");
    println!("| XDP_PASS floor (`xdp_pass`) | 2 | none | none |");
    for p in &paths {
        let lookups: Vec<String> = p
            .count
            .lookups
            .iter()
            .map(|(m, n)| format!("{m} x{n}"))
            .collect();
        println!(
            "| {} | {} | {} | {} |",
            p.name,
            p.count.insns,
            p.count.helper_summary(),
            lookups.join(", ")
        );
    }
    Ok(())
}

/// The verifier's figure per program: instructions it processed while loading it, of the
/// kernel's limit (see DEVELOPING.md, "Reading the verifier's instruction figure").
pub fn verified_rows() -> anyhow::Result<()> {
    println!(
        "| program (object, load options) | verified instructions | of the {VERIFIER_LIMIT} limit |"
    );
    println!("| --- | ---: | ---: |");
    for v in verified_counts()? {
        println!(
            "| `{}` ({}) | {} | {:.1} % |",
            v.program,
            v.load,
            v.insns,
            v.percent()
        );
    }
    Ok(())
}
