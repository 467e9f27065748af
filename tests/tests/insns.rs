//! The instruction counter of `cargo xtask bench` (`lb_tests::insns`) agrees with the kernel
//! on every benchmarked path (action and output bytes), and the L2 paths make no BPF-to-BPF
//! call: a field copy between two raw places once compiled to two `memmove` calls (a byte
//! loop each) on every forwarded packet.
use lb_tests::{
    insns::{count_cached, count_checked},
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
