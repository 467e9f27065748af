//! The instruction counter of `cargo xtask bench` (`lb_tests::insns`) agrees with the kernel
//! on every benchmarked path (action and output bytes), and the L2 paths make no BPF-to-BPF
//! call: a field copy between two raw places once compiled to two `memmove` calls (a byte
//! loop each) on every forwarded packet. And every program keeps headroom under the
//! verifier's instruction budget.
use lb_tests::{
    insns::{VERIFIER_LIMIT, count_cached, count_checked, verified_counts},
    world::{SCENE, World},
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], flags: &str) -> Vec<u8> {
    SCENE.tcp4((src, sport), (dst, 80), flags, &[0u8; 64])
}

#[test]
fn every_path_agrees_with_the_kernel_and_inlines_its_copies() -> anyhow::Result<()> {
    let vip = [10, 0, 0, 10];
    let mut world = World::new()?;
    let non_vip = count_checked(&mut world, &tcp([192, 0, 2, 7], 40000, [10, 0, 0, 99], "A"))?;
    assert_eq!(non_vip.action, Some(XDP_PASS));
    let flow = tcp([192, 0, 2, 7], 40000, vip, "A");
    let first = count_checked(&mut world, &flow)?;
    world.run(&flow)?;
    let established = count_cached(&mut world, &flow)?;
    let mut uncached = World::without_flow_cache()?;
    uncached.run(&flow)?;
    uncached.run(&flow)?;
    let from_table = count_checked(&mut uncached, &flow)?;
    let syn = count_checked(&mut world, &tcp([192, 0, 2, 8], 40001, vip, "S"))?;
    let mut stateless = World::stateless()?;
    let any = count_checked(&mut stateless, &flow)?;
    for (name, c) in [
        ("first ACK", &first),
        ("established", &established),
        ("established, no flow cache", &from_table),
        ("SYN", &syn),
        ("flow table off", &any),
    ] {
        // XDP_TX with the backend's MACs, as the kernel did.
        assert_eq!(c.action, Some(XDP_TX), "{name}");
        assert_eq!(c.calls, 0, "{name}: a BPF-to-BPF call on the L2 path");
        println!("{name}: {} instructions, {}", c.insns, c.helper_summary());
    }
    // An established hit is the shortest balancing path; non-VIP traffic far shorter. The
    // flow cache decides it without the flow table's lookup.
    assert!(non_vip.insns * 2 < established.insns, "{non_vip:?}");
    assert_eq!(
        established.lookups.get("LB_FLOWS"),
        None,
        "{:?}",
        established.lookups
    );
    assert_eq!(from_table.lookups.get("LB_FLOWS"), Some(&1));
    assert!(established.insns < syn.insns && established.insns < first.insns);
    Ok(())
}

/// Every program the agent and `lb decap` load stays under 70 % of the verifier's budget, in
/// every load-time configuration: the rest is headroom for what is still to come. A program
/// past it is named with its figure.
#[test]
fn every_program_keeps_verifier_headroom() -> anyhow::Result<()> {
    let limit = VERIFIER_LIMIT / 10 * 7;
    let counts = verified_counts()?;
    for v in &counts {
        println!(
            "{} ({}): {} verified instructions, {:.1} %",
            v.program,
            v.load,
            v.insns,
            v.percent()
        );
    }
    assert!(counts.iter().any(|v| v.program == "lb_xdp"), "{counts:?}");
    assert!(counts.iter().any(|v| v.program == "lb_decap"), "{counts:?}");
    let over: Vec<String> = counts
        .iter()
        .filter(|v| v.insns > limit)
        .map(|v| {
            format!(
                "{} ({}): {} ({:.1} %)",
                v.program,
                v.load,
                v.insns,
                v.percent()
            )
        })
        .collect();
    assert!(
        over.is_empty(),
        "past 70 % ({limit}) of the verifier's {VERIFIER_LIMIT}-instruction limit: {}",
        over.join("; ")
    );
    Ok(())
}

/// The product objects (embedded in `lb`) hold no benchmark harness; the benchmark objects
/// hold the product's programs and the harnesses `lb-bench` runs.
#[test]
fn harnesses_only_in_the_benchmark_objects() -> anyhow::Result<()> {
    let programs = |object: &[u8]| -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = aya_obj::Object::parse(object)?
            .programs
            .into_keys()
            .collect();
        names.sort();
        Ok(names)
    };
    let harness = |n: &String| n.starts_with("bench_");
    for (name, product, bench) in [
        (
            "lb-ebpf",
            lb_userspace::EBPF_OBJECT,
            lb_userspace::BENCH_OBJECT,
        ),
        (
            "lb-decap",
            lb_userspace::DECAP_OBJECT,
            lb_userspace::DECAP_BENCH_OBJECT,
        ),
    ] {
        let (product, bench) = (programs(product)?, programs(bench)?);
        assert!(!product.iter().any(harness), "{name}: {product:?}");
        assert!(bench.iter().any(harness), "{name}-bench: {bench:?}");
        let shipped: Vec<&String> = bench.iter().filter(|n| !harness(n)).collect();
        assert_eq!(shipped, product.iter().collect::<Vec<_>>(), "{name}");
    }
    Ok(())
}
