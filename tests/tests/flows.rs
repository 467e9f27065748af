//! Flow-table semantics through the verifier-loaded program (BPF_PROG_TEST_RUN): each case
//! states the frames, the backend that must get them and the flow events that must move.
//!
//! The rules (README, "Flow table"): a SYN is placed but not remembered; a flow's first
//! remembered packet goes on probation and its next one makes it established; drained keeps
//! flows but a SYN reusing the tuple is placed again; down (or removed, or recycled) moves
//! flows at once; RST ends an entry, FIN ends it after a grace; UDP entries age out per VIP.
//! ICMP errors are steered only when addressed to the VIP they quote, from the quoted bytes
//! inside the IP length, and never create an entry.
use std::{collections::BTreeMap, time::Duration};

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use lb_common::{
    BACKEND_F_DOWN, BACKEND_F_DRAINED, FlowEvent, FlowKey, PROTO_TCP, PROTO_UDP, Stat,
};
use lb_tests::{
    frames::{v4, v6},
    world::{FIN_GRACE_S, LB_MAC, SCENE, World, backend_mac, flow_key, ip},
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const CLIENT: &str = "192.0.2.7";
const VIP: &str = "10.0.0.10";
const VIP6: &str = "2001:db8::10";
/// Index of 10.0.0.10:80/tcp and 10.0.0.10:53/udp in the world.
const TCP_VIP: usize = 0;
const UDP_VIP: usize = 1;

fn tcp(sport: u16, flags: &str) -> Vec<u8> {
    SCENE.tcp4((v4(CLIENT), sport), (v4(VIP), 80), flags, b"data")
}

fn udp(sport: u16) -> Vec<u8> {
    SCENE.udp4(v4(CLIENT), sport, v4(VIP), 53)
}

/// A datagram from IPv6 client `client` to [2001:db8::10]:53.
fn udp6(client: &str, sport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    SCENE
        .eth()
        .ipv6(v6(client), v6(VIP6), 64)
        .udp(sport, 53)
        .write(&mut out, b"query")
        .expect("build");
    out
}

fn tcp_key(sport: u16) -> FlowKey {
    flow_key(ip(CLIENT), sport, ip(VIP), 80, PROTO_TCP)
}

fn udp_key(sport: u16) -> FlowKey {
    flow_key(ip(CLIENT), sport, ip(VIP), 53, PROTO_UDP)
}

/// Flow events since the last call.
struct Events {
    last: BTreeMap<&'static str, u64>,
}

impl Events {
    fn new(world: &World) -> anyhow::Result<Self> {
        let mut e = Events {
            last: BTreeMap::new(),
        };
        e.delta(world)?;
        Ok(e)
    }

    /// The events that moved since the last call, by name (zeros left out).
    fn delta(&mut self, world: &World) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let g = world.dp.stats.global()?;
        let mut out = BTreeMap::new();
        for ev in FlowEvent::ALL {
            let now = g.flow(ev);
            let d = now - self.last.get(ev.name()).copied().unwrap_or(0);
            if d > 0 {
                out.insert(ev.name(), d);
            }
            self.last.insert(ev.name(), now);
        }
        Ok(out)
    }
}

fn moved(events: &[(FlowEvent, u64)]) -> BTreeMap<&'static str, u64> {
    events.iter().map(|(e, n)| (e.name(), *n)).collect()
}

/// Runs `frame`; it must be sent (XDP_TX) to backend `want`.
fn sent_to(world: &mut World, frame: &[u8], want: u32) -> anyhow::Result<()> {
    let (action, out) = world.run(frame)?;
    assert_eq!(action, XDP_TX, "not forwarded");
    let mut expect = frame.to_vec();
    expect[0..6].copy_from_slice(&backend_mac(want));
    expect[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(out, expect, "not rewritten for backend {want}");
    Ok(())
}

/// Makes the flow of `frame` established on its table backend (two packets); returns it.
fn establish(world: &mut World, frame: &[u8], key: &FlowKey) -> anyhow::Result<u32> {
    let b = world.table_backend(key).expect("VIP with backends");
    sent_to(world, frame, b)?;
    sent_to(world, frame, b)?;
    assert_eq!(world.dp.flows.get(key)?.map(|f| f.backend_id), Some(b));
    Ok(b)
}

/// The VIP's backends other than `b`.
fn without(b: u32, all: &[u32]) -> Vec<u32> {
    all.iter().copied().filter(|x| *x != b).collect()
}

#[test]
fn a_syn_is_placed_but_not_remembered_and_flows_are_established_on_their_second_packet()
-> anyhow::Result<()> {
    let mut world = World::new()?;
    let mut ev = Events::new(&world)?;
    let key = tcp_key(41000);
    let b = world.table_backend(&key).expect("backend");
    sent_to(&mut world, &tcp(41000, "S"), b)?;
    assert!(world.dp.flows.get(&key)?.is_none() && world.dp.flows.probation(&key)?.is_none());
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::SynPlaced, 1)]));
    // The handshake's ACK: on probation.
    sent_to(&mut world, &tcp(41000, "A"), b)?;
    assert!(world.dp.flows.probation(&key)?.is_some() && world.dp.flows.get(&key)?.is_none());
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::MissNotSyn, 1)]));
    // Its next packet: established.
    sent_to(&mut world, &tcp(41000, "A"), b)?;
    assert!(world.dp.flows.probation(&key)?.is_none() && world.dp.flows.get(&key)?.is_some());
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Promoted, 1)]));
    sent_to(&mut world, &tcp(41000, "A"), b)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Hit, 1)]));
    // A first UDP datagram goes on probation too.
    let ukey = udp_key(41001);
    let ub = world.table_backend(&ukey).expect("backend");
    sent_to(&mut world, &udp(41001), ub)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::NewUdp, 1)]));
    // Counted once, when first remembered (the ACK), not at the SYN.
    assert_eq!(world.dp.stats.vip(TCP_VIP as u32)?.new_flows, 1);
    Ok(())
}

/// The established table's key is 16 bytes (`lb_common::TableKey`): exact for IPv4, a seeded
/// fingerprint of the addresses for IPv6. Flows that differ only in an address (same ports)
/// must each get an entry of their own, found by the agent's lookup (`trace`'s) as the
/// kernel keyed it: a collision would show as a first datagram that hits another flow's
/// entry instead of going on probation.
#[test]
fn flows_differing_only_in_an_address_keep_entries_of_their_own() -> anyhow::Result<()> {
    let mut world = World::new()?;
    let mut ev = Events::new(&world)?;
    let clients6 = [
        "2001:db8:c::7",
        "2001:db8:c::8",
        "2001:db8:d::7",
        "2001:db9:c::7",
    ];
    for c in clients6 {
        let key = flow_key(ip(c), 5353, ip(VIP6), 53, PROTO_UDP);
        establish(&mut world, &udp6(c, 5353), &key)?;
        assert_eq!(
            ev.delta(&world)?,
            moved(&[(FlowEvent::NewUdp, 1), (FlowEvent::Promoted, 1)]),
            "{c}"
        );
    }
    for c in ["192.0.2.7", "192.0.2.8", "198.51.100.7"] {
        let key = flow_key(ip(c), 5353, ip(VIP), 53, PROTO_UDP);
        establish(&mut world, &SCENE.udp4(v4(c), 5353, v4(VIP), 53), &key)?;
        assert_eq!(
            ev.delta(&world)?,
            moved(&[(FlowEvent::NewUdp, 1), (FlowEvent::Promoted, 1)]),
            "{c}"
        );
    }
    // Every entry still there, under its own key.
    for c in clients6 {
        let key = flow_key(ip(c), 5353, ip(VIP6), 53, PROTO_UDP);
        assert_eq!(
            world.dp.flows.get(&key)?.map(|f| f.backend_id),
            world.table_backend(&key),
            "{c}"
        );
    }
    Ok(())
}

#[test]
fn established_flows_stay_through_table_changes_and_move_when_their_backend_goes()
-> anyhow::Result<()> {
    let mut world = World::new()?;
    let key = tcp_key(42000);
    let frame = tcp(42000, "A");
    let first = establish(&mut world, &frame, &key)?;
    let mut ev = Events::new(&world)?;
    // Out of the table (a new backend set): the flow stays.
    world.set_vip_backends(TCP_VIP, &without(first, &[1, 2, 3]))?;
    let next = world.table_backend(&key).expect("backend");
    assert_ne!(next, first);
    sent_to(&mut world, &frame, first)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Hit, 1)]));
    // The backend removed: placed again, and still established.
    world.dp.backends.clear(first)?;
    sent_to(&mut world, &frame, next)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Replaced, 1)]));
    assert_eq!(world.dp.flows.get(&key)?.map(|f| f.backend_id), Some(next));
    // Its id given to another backend (generation bump): placed again.
    world.set_backend(next, ip("10.1.0.200"))?;
    sent_to(&mut world, &frame, next)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Replaced, 1)]));
    Ok(())
}

#[test]
fn drained_keeps_its_flows_but_a_syn_reusing_a_tuple_is_placed_again() -> anyhow::Result<()> {
    let mut world = World::new()?;
    let key = tcp_key(43000);
    let b = establish(&mut world, &tcp(43000, "A"), &key)?;
    world.set_backend_flags(b, BACKEND_F_DRAINED)?;
    world.set_vip_backends(TCP_VIP, &without(b, &[1, 2, 3]))?;
    let next = world.table_backend(&key).expect("backend");
    let mut ev = Events::new(&world)?;
    sent_to(&mut world, &tcp(43000, "A"), b)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Hit, 1)]));
    // A SYN retransmit would stick to a live backend; to a drained one it is a new connection.
    sent_to(&mut world, &tcp(43000, "S"), next)?;
    assert_eq!(
        ev.delta(&world)?,
        moved(&[(FlowEvent::SynPlaced, 1), (FlowEvent::Replaced, 1)])
    );
    assert!(world.dp.flows.get(&key)?.is_none(), "the old entry is done");
    Ok(())
}

#[test]
fn down_moves_existing_tcp_and_udp_flows_at_once() -> anyhow::Result<()> {
    let mut world = World::new()?;
    let tkey = tcp_key(44000);
    let tb = establish(&mut world, &tcp(44000, "A"), &tkey)?;
    // A UDP flow on the same backend (the UDP VIP has backends 1 and 2).
    let (usport, ukey) = (44001..45000)
        .map(|p| (p, udp_key(p)))
        .find(|(_, k)| world.table_backend(k) == Some(tb.min(2)))
        .expect("a UDP flow on the backend");
    let ub = establish(&mut world, &udp(usport), &ukey)?;
    let mut ev = Events::new(&world)?;
    for b in [tb, ub] {
        world.set_backend_flags(b, BACKEND_F_DOWN)?;
    }
    world.set_vip_backends(TCP_VIP, &without(tb, &[1, 2, 3]))?;
    world.set_vip_backends(UDP_VIP, &without(ub, &[1, 2]))?;
    let (tnext, unext) = (
        world.table_backend(&tkey).expect("b"),
        world.table_backend(&ukey).expect("b"),
    );
    sent_to(&mut world, &tcp(44000, "A"), tnext)?;
    sent_to(&mut world, &udp(usport), unext)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Replaced, 2)]));
    assert_eq!(
        world.dp.flows.get(&tkey)?.map(|f| f.backend_id),
        Some(tnext)
    );
    assert_eq!(
        world.dp.flows.get(&ukey)?.map(|f| f.backend_id),
        Some(unext)
    );
    Ok(())
}

#[test]
fn rst_ends_an_entry_and_fin_ends_it_after_the_grace() -> anyhow::Result<()> {
    let mut world = World::new()?;
    let key = tcp_key(45000);
    let b = establish(&mut world, &tcp(45000, "A"), &key)?;
    let mut ev = Events::new(&world)?;
    sent_to(&mut world, &tcp(45000, "RA"), b)?;
    assert_eq!(
        ev.delta(&world)?,
        moved(&[(FlowEvent::Hit, 1), (FlowEvent::EndedRst, 1)])
    );
    assert!(world.dp.flows.get(&key)?.is_none());

    let key = tcp_key(45001);
    let b = establish(&mut world, &tcp(45001, "A"), &key)?;
    world.set_vip_backends(TCP_VIP, &without(b, &[1, 2, 3]))?;
    let next = world.table_backend(&key).expect("backend");
    ev.delta(&world)?;
    sent_to(&mut world, &tcp(45001, "FA"), b)?;
    // The other side's FIN and the last ACKs still reach it within the grace.
    sent_to(&mut world, &tcp(45001, "A"), b)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Hit, 2)]));
    // Quiet for longer than the grace: the entry no longer decides.
    std::thread::sleep(Duration::from_millis(u64::from(FIN_GRACE_S) * 1000 + 1300));
    sent_to(&mut world, &tcp(45001, "A"), next)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Replaced, 1)]));
    // A SYN after a FIN is a new connection even within the grace.
    let key = tcp_key(45002);
    let b = establish(&mut world, &tcp(45002, "FA"), &key)?;
    world.set_vip_backends(TCP_VIP, &without(b, &[1, 2, 3]))?;
    let next = world.table_backend(&key).expect("backend");
    ev.delta(&world)?;
    sent_to(&mut world, &tcp(45002, "S"), next)?;
    assert_eq!(
        ev.delta(&world)?,
        moved(&[(FlowEvent::SynPlaced, 1), (FlowEvent::Replaced, 1)])
    );
    Ok(())
}

#[test]
fn udp_entries_age_out_after_the_vips_idle_time() -> anyhow::Result<()> {
    let mut world = World::new()?;
    world.set_udp_idle(UDP_VIP, 1)?;
    let key = udp_key(46000);
    let b = establish(&mut world, &udp(46000), &key)?;
    world.set_vip_backends(UDP_VIP, &without(b, &[1, 2]))?;
    let next = world.table_backend(&key).expect("backend");
    let mut ev = Events::new(&world)?;
    sent_to(&mut world, &udp(46000), b)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Hit, 1)]));
    // The coarse clock counts whole seconds: idle > 1 s needs two ticks.
    std::thread::sleep(Duration::from_millis(2300));
    sent_to(&mut world, &udp(46000), next)?;
    assert_eq!(ev.delta(&world)?, moved(&[(FlowEvent::Replaced, 1)]));
    // TCP does not age: an established TCP flow idle as long keeps its backend.
    Ok(())
}

/// ICMP "fragmentation needed" from a router to `to`, quoting `quote` bytes of a packet the
/// backend sent VIP:80 -> client:`cport`, then `pad` bytes of Ethernet padding.
fn icmp_error(to: &str, cport: u16, quote: usize, pad: usize) -> Vec<u8> {
    let mut inner = Vec::new();
    PacketBuilder::ipv4(v4(VIP), v4(CLIENT), 64)
        .tcp(80, cport, 5, 1000)
        .write(&mut inner, &[0u8; 100])
        .expect("inner");
    inner.truncate(quote);
    let mut out = Vec::new();
    SCENE
        .eth()
        .ipv4(v4("198.51.100.1"), v4(to), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut out, &inner)
        .expect("frame");
    // Padding that repeats the quoted ports, as a NIC's garbage might.
    out.extend(inner.iter().cycle().skip(20).take(pad));
    out
}

#[test]
fn icmp_errors_are_steered_only_to_their_vip_within_the_ip_length() -> anyhow::Result<()> {
    let mut world = World::new()?;
    let key = tcp_key(47000);
    let b = world.table_backend(&key).expect("backend");
    let mut ev = Events::new(&world)?;
    let passed = |w: &World| w.dp.stats.global().map(|g| g.get(Stat::PassNotVip).packets);
    // Addressed to the VIP, quoting its flow: forwarded like the flow, no entry made.
    sent_to(&mut world, &icmp_error(VIP, 47000, 28, 0), b)?;
    assert!(world.dp.flows.get(&key)?.is_none() && world.dp.flows.probation(&key)?.is_none());
    assert_eq!(ev.delta(&world)?, moved(&[]));
    // Addressed to the load balancer's own address: the kernel's, whatever it quotes.
    let before = passed(&world)?;
    let frame = icmp_error("10.0.0.1", 47000, 28, 0);
    assert_eq!(world.run(&frame)?, (XDP_PASS, frame.clone()));
    assert_eq!(passed(&world)?, before + 1);
    // Quoted ports beyond the IP total length (only in the padding): not read, passed.
    let frame = icmp_error(VIP, 47000, 22, 16);
    assert_eq!(world.run(&frame)?, (XDP_PASS, frame.clone()));
    assert_eq!(passed(&world)?, before + 2);
    // An error to another address quoting the VIP without backends is not dropped.
    let frame = {
        let mut inner = Vec::new();
        PacketBuilder::ipv4(v4("10.0.0.40"), v4(CLIENT), 64)
            .tcp(80, 47001, 5, 1000)
            .write(&mut inner, &[0u8; 8])
            .expect("inner");
        let mut out = Vec::new();
        SCENE
            .eth()
            .ipv4(v4("198.51.100.1"), v4("10.0.0.1"), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut out, &inner[..28])
            .expect("frame");
        out
    };
    assert_eq!(world.run(&frame)?, (XDP_PASS, frame.clone()));
    assert_eq!(passed(&world)?, before + 3);
    Ok(())
}

/// `--flow-table off`: every packet (SYN, ACK, UDP) is placed by the live table, nothing is
/// remembered (no flow events, empty tables), a drained or removed backend's flows move with
/// their slots at once, and the program still passes the verifier with the table gone.
#[test]
fn without_a_flow_table_the_live_table_decides_every_packet() -> anyhow::Result<()> {
    let mut world = World::stateless()?;
    let mut events = Events::new(&world)?;
    for sport in 50000..50040u16 {
        let key = tcp_key(sport);
        let want = backend_mac(world.table_backend(&key).expect("backend"));
        for flags in ["S", "A", "A", "FA"] {
            let (action, out) = world.run(&tcp(sport, flags))?;
            assert_eq!((action, &out[..6]), (XDP_TX, &want[..]), "{sport} {flags}");
        }
        let (action, out) = world.run(&udp(sport))?;
        let want = backend_mac(world.table_backend(&udp_key(sport)).expect("backend"));
        assert_eq!((action, &out[..6]), (XDP_TX, &want[..]));
    }
    assert!(events.delta(&world)?.is_empty(), "no flow-table events");
    assert!(world.dp.flows.get(&tcp_key(50000))?.is_none());
    assert!(world.dp.flows.probation(&tcp_key(50000))?.is_none());
    // A table change moves exactly the flows whose slot changed, at their next packet.
    world.set_vip_backends(TCP_VIP, &[1, 2])?;
    for sport in 50000..50040u16 {
        let want = backend_mac(world.table_backend(&tcp_key(sport)).expect("backend"));
        let (_, out) = world.run(&tcp(sport, "A"))?;
        assert_eq!(&out[..6], &want[..]);
        assert_ne!(&out[..6], &backend_mac(3)[..], "backend 3 left the table");
    }
    Ok(())
}

/// The per-CPU flow cache (`lb_common::cache`) never decides what the flow table would not in
/// the same tick: a busy flow's packet is served from this CPU's slot, and a SYN, FIN or
/// RST empties it before the table changes the entry; an entry that no longer decides (its
/// backend down) is left for the table, so bringing the backend back within the second does
/// not take the moved flow back; a FIN entry is never cached. (Each step runs on CPU 0, and
/// its outcome is the table's whichever tick it falls in; the slot is read back to show the
/// cache took part.)
#[test]
fn the_flow_cache_never_outlives_the_tables_decision() -> anyhow::Result<()> {
    lb_tests::world::pin_to_cpu0()?;
    let mut world = World::new()?;
    let mut ev = Events::new(&world)?;
    let on_cpu0 = |world: &World, key: &FlowKey| -> anyhow::Result<Option<u32>> {
        Ok(world
            .dp
            .flows
            .cached(key)?
            .into_iter()
            .find(|(cpu, _)| *cpu == 0)
            .map(|(_, v)| v.backend_id))
    };

    // Promoted on its second packet, which fills the slot; the next ones are hits.
    let key = tcp_key(47000);
    let b = establish(&mut world, &tcp(47000, "A"), &key)?;
    assert_eq!(on_cpu0(&world, &key)?, Some(b));
    for _ in 0..5 {
        sent_to(&mut world, &tcp(47000, "A"), b)?;
    }
    assert_eq!(
        ev.delta(&world)?,
        moved(&[
            (FlowEvent::MissNotSyn, 1),
            (FlowEvent::Promoted, 1),
            (FlowEvent::Hit, 5)
        ])
    );

    // Drained, and a SYN reuses the tuple: placed again; its ACK must follow it, not the
    // cached entry of the old connection.
    world.set_backend_flags(b, BACKEND_F_DRAINED)?;
    world.set_vip_backends(TCP_VIP, &without(b, &[1, 2, 3]))?;
    let next = world.table_backend(&key).expect("backend");
    sent_to(&mut world, &tcp(47000, "S"), next)?;
    assert_eq!(on_cpu0(&world, &key)?, None, "the SYN emptied the slot");
    sent_to(&mut world, &tcp(47000, "A"), next)?;
    assert_eq!(
        ev.delta(&world)?,
        moved(&[
            (FlowEvent::SynPlaced, 1),
            (FlowEvent::Replaced, 1),
            (FlowEvent::MissNotSyn, 1)
        ])
    );
    world.set_backend_flags(b, 0)?;
    world.set_vip_backends(TCP_VIP, &[1, 2, 3])?;

    // RST: the slot is emptied with the entry; the next ACK is a miss, not a cached hit.
    let key = tcp_key(47001);
    let b = establish(&mut world, &tcp(47001, "A"), &key)?;
    ev.delta(&world)?;
    sent_to(&mut world, &tcp(47001, "RA"), b)?;
    assert_eq!(on_cpu0(&world, &key)?, None, "the RST emptied the slot");
    sent_to(&mut world, &tcp(47001, "A"), b)?;
    assert_eq!(
        ev.delta(&world)?,
        moved(&[
            (FlowEvent::Hit, 1),
            (FlowEvent::EndedRst, 1),
            (FlowEvent::MissNotSyn, 1)
        ])
    );

    // FIN: the table records it (the slot is emptied first), so a SYN after it in the same
    // tick is a new connection; the ACKs after it are the table's (a FIN entry's grace counts
    // from its last packet, which only the table keeps), never the cache's.
    let key = tcp_key(47002);
    let b = establish(&mut world, &tcp(47002, "A"), &key)?;
    sent_to(&mut world, &tcp(47002, "FA"), b)?;
    assert_eq!(
        world.dp.flows.get(&key)?.map(|f| f.flags),
        Some(lb_common::FLOW_F_FIN)
    );
    world.set_vip_backends(TCP_VIP, &without(b, &[1, 2, 3]))?;
    let next = world.table_backend(&key).expect("backend");
    sent_to(&mut world, &tcp(47002, "A"), b)?;
    sent_to(&mut world, &tcp(47002, "A"), b)?;
    assert_eq!(on_cpu0(&world, &key)?, None, "a FIN entry is not cached");
    sent_to(&mut world, &tcp(47002, "S"), next)?;
    world.set_vip_backends(TCP_VIP, &[1, 2, 3])?;

    // Down: the cached entry no longer decides; the flow moves and stays moved when its old
    // backend comes back within the second.
    let key = tcp_key(47003);
    let b = establish(&mut world, &tcp(47003, "A"), &key)?;
    sent_to(&mut world, &tcp(47003, "A"), b)?;
    world.set_backend_flags(b, BACKEND_F_DOWN)?;
    world.set_vip_backends(TCP_VIP, &without(b, &[1, 2, 3]))?;
    let next = world.table_backend(&key).expect("backend");
    ev.delta(&world)?;
    sent_to(&mut world, &tcp(47003, "A"), next)?;
    sent_to(&mut world, &tcp(47003, "A"), next)?;
    assert_eq!(on_cpu0(&world, &key)?, Some(next));
    world.set_backend_flags(b, 0)?;
    sent_to(&mut world, &tcp(47003, "A"), next)?;
    assert_eq!(
        ev.delta(&world)?,
        moved(&[(FlowEvent::Replaced, 1), (FlowEvent::Hit, 2)])
    );

    // UDP uses it too, and still ages by the table: one datagram a second keeps it.
    let ukey = udp_key(47004);
    let ub = establish(&mut world, &udp(47004), &ukey)?;
    assert_eq!(on_cpu0(&world, &ukey)?, Some(ub));
    Ok(())
}
