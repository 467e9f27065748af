//! Full NAT in XDP (`forward = "nat"`), both directions; the tables and rules are
//! `lb_common::nat`'s.
//!
//! - Client -> VIP ([`forward`]): the connection's forward entry gives the tuple LB address:NAT
//!   port -> backend:port; a connection without one takes a NAT port (the reverse entry is
//!   inserted first, `BPF_NOEXIST`, so a port is never handed out twice).
//! - Backend -> LB address ([`reply`]): the reverse entry gives VIP -> client.
//! - An ICMP error about a connection, from either side, is translated with that side's entry
//!   for the other (`nat_rewrite`).
//!
//! Either way the FIB is asked for the next hop *before* the packet is touched (a drop sees
//! the original), then addresses and ports are rewritten with incremental checksum updates
//! (RFC 1624) and the frame goes out by XDP_TX or a redirect.
//!
//! The pool of NAT addresses (is a packet for one, how many a family holds) is `nat/pool.rs`:
//! every VIP packet asks it, not only NAT's. The rest stays in this one file on purpose: moving
//! the allocation or the send path into modules of their own changed how LLVM laid out
//! `lb_nat` (its stack slots, and the verifier's count of it), so they stay beside `forward`.
// Keys go to the map helpers by reference: by value they would be copied onto the stack.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST, xdp_action},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_DOWN, BACKEND_F_PRESENT, Backend, DEFAULT_UDP_IDLE_S, FlowKey, LbConfig,
    NAT_F_CLOSING, NAT_PORT_PROBES, NAT_REFUSED_NO_PORT, NAT_REFUSED_TABLE_FULL, NEXTHOP_TTL_S,
    NatEntry, PROTO_TCP, PROTO_UDP, Stat, TCP_ACK, TCP_SYN, TcpSeg, nat_addr_index, nat_expired,
    nat_port, nat_refused_index,
};
use network_types::eth::EthHdr;

use crate::{
    Verdict, capture,
    encap::next_hop,
    fib::{self, Fib, NextHop, Outer},
    maps,
    maps::{
        LB_BACKENDS, LB_NAT_ADDRS, LB_NAT_FWD, LB_NAT_REFUSED, LB_NAT_REV, LB_PROGS, LB_TX_PORTS,
        PROG_NAT, present_vip,
    },
    nat_rewrite::{rewrite, rewrite_icmp},
    nat_state, parse,
    parse::{Parsed, ptr_at_mut},
    select, stats,
};

mod pool;

pub use self::pool::is_nat_addr;
use self::pool::{family_index, pool_len};

const EEXIST: i32 = 17;

/// Work space of [`allocate`] (per CPU, in a map: the stack has no room for it).
#[repr(C)]
struct Scratch {
    fwd: NatEntry,
    rev: NatEntry,
    rkey: FlowKey,
    okey: FlowKey,
    seg: TcpSeg,
}

// Described as `lb_common::NAT_SCRATCH_MAP`.
const _: () = assert!(core::mem::size_of::<Scratch>() == lb_common::NAT_SCRATCH_SIZE as usize);

#[map(name = "LB_NAT_SCRATCH")]
static LB_NAT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The backend a new connection goes to: the slot table's pick, entry in map memory.
struct Picked {
    id: u32,
    vip_id: u32,
    b: &'static Backend,
}

const TABLE_FULL: Verdict = Verdict::discard(Stat::DropNatTableFull);
const BROKEN: Verdict = Verdict::discard(Stat::DropMalformed);

#[inline(always)]
fn now_s() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Refreshes an entry's last-seen in place, at most once a second.
#[inline(always)]
fn touch(e: &mut NatEntry, now: u32) {
    if e.last_seen != now {
        e.last_seen = now;
    }
}

/// This CPU's scratch record.
#[inline(always)]
fn scratch() -> Result<&'static mut Scratch, Verdict> {
    let s = LB_NAT_SCRATCH
        .get_ptr_mut(0)
        .ok_or(Verdict::discard(Stat::DropTxError))?;
    // SAFETY: this CPU's scratch record; nothing else uses it meanwhile.
    Ok(unsafe { &mut *s })
}

/// Enters the NAT program ([`crate::lb_nat`]); returns only if the tail call failed.
#[inline(always)]
pub fn enter(ctx: &XdpContext) {
    // SAFETY: tail call into our own program array; on success it does not return.
    unsafe { LB_PROGS.tail_call(ctx, PROG_NAT) };
}

/// The NAT program: the frame parsed again (cheaper than carrying state across the tail
/// call), then a backend's answer or a client's packet.
#[inline(always)]
pub fn run(ctx: &XdpContext, len: u64) -> Result<Verdict, Verdict> {
    let mut pkt = parse::Parsed::EMPTY;
    parse::parse(ctx, &mut pkt)?;
    // Entered only for a packet a VIP's guard already let through (`select`'s gate runs
    // before a NAT VIP's packet leaves the full path) or for an answer to a NAT address.
    pkt.admitted = true;
    if is_nat_addr(&pkt) {
        reply(ctx, &pkt, len)
    } else {
        forward(ctx, &pkt, len)
    }
}

/// A backend's answer to a NAT address: translated back to VIP -> client.
#[inline(always)]
fn reply(ctx: &XdpContext, pkt: &Parsed, len: u64) -> Result<Verdict, Verdict> {
    // To a NAT address, matching no translation: the kernel's own traffic. (A NAT address
    // is not also a VIP address: the agent refuses that.)
    let e = LB_NAT_REV
        .get_ptr_mut(&pkt.key)
        .ok_or(Verdict::pass(Stat::PassNatUnknown))?;
    // SAFETY: the map's value, valid while the program runs; a racing CPU writes the same.
    let e = unsafe { &mut *e };
    capture::nat_answer(pkt, e);
    // An ICMP error about a translated flow (port unreachable, fragmentation needed, packet
    // too big) goes to its client, translated; it does not refresh the connection.
    if !pkt.icmp_error {
        let s = scratch()?;
        nat_state::segment(ctx, pkt, &mut s.seg)?;
        let now = now_s();
        nat_state::backend(pkt, &s.seg, e, &mut s.okey, now)?;
        touch(e, now);
        stats::count_backend(e.backend_id, len);
    }
    send(ctx, pkt, e, None)
}

/// The backend of a forward entry that still carries its connection: the same one and not
/// down, and the packet does not open a new connection on a closed tuple.
#[inline(always)]
fn still_good(e: &NatEntry, pkt: &Parsed) -> Option<&'static Backend> {
    let b = LB_BACKENDS.get(e.backend_id)?;
    if b.flags & BACKEND_F_PRESENT == 0
        || b.flags & BACKEND_F_DOWN != 0
        || b.generation != e.backend_generation
    {
        return None;
    }
    let syn = pkt.key.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    (!(syn && e.flags & NAT_F_CLOSING != 0)).then_some(b)
}

/// A client's packet for a NAT VIP: translated to the connection's backend, or to the one
/// the VIP's slot table gives a new connection.
#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Parsed, len: u64) -> Result<Verdict, Verdict> {
    let cfg = maps::config();
    let now = now_s();
    let entry = LB_NAT_FWD.get_ptr_mut(&pkt.key);
    // Entries are used in place (map memory), never copied: an entry is 56 bytes. The
    // backend is read once: it decides whether the entry still holds, and where to send.
    // SAFETY (each `unsafe`): the map's value, valid while the program runs; a racing CPU
    // writes the same.
    let (to, b): (&mut NatEntry, Option<&'static Backend>) = match entry {
        // An ICMP error from the clients' side about a NAT'ed flow (a router on the way back
        // to the client): translated for the backend, never a new connection.
        Some(e) if pkt.icmp_error => {
            let e = unsafe { &mut *e };
            let b = LB_BACKENDS.get(e.backend_id);
            (e, b)
        }
        None if pkt.icmp_error => return Err(Verdict::pass(Stat::PassNatIcmp)),
        Some(e) if let Some(b) = still_good(unsafe { &*e }, pkt) => {
            let e = unsafe { &mut *e };
            let s = scratch()?;
            nat_state::segment(ctx, pkt, &mut s.seg)?;
            nat_state::client(pkt, &s.seg, e, &mut s.okey, now)?;
            touch(e, now);
            (e, Some(b))
        }
        // Only a connection's first packet takes a port: anything else without a pair is
        // dropped (a pair whose backend went away is placed again: its tuple is known).
        None if !nat_state::opens(pkt) => return Err(Verdict::discard(Stat::DropNatNoEntry)),
        _ => {
            // The gate passed before this program (`run`): never `guard::ENTER` here.
            let (id, vip_id) = select::slot_backend(pkt, cfg)?;
            let b = LB_BACKENDS
                .get(id)
                .ok_or(Verdict::discard(Stat::DropNoBackend))?;
            (
                allocate(ctx, cfg, pkt, &Picked { id, vip_id, b }, now)?,
                Some(b),
            )
        }
    };
    stats::count_backend(to.backend_id, len);
    capture::nat_backend(to.backend_id);
    let picked = b.map(|b| Picked {
        id: to.backend_id,
        vip_id: 0,
        b,
    });
    send(ctx, pkt, to, picked.as_ref())
}

/// Takes a half-open slot and a NAT port toward the picked backend for a new connection and
/// records both directions (half-open until the handshake completes or the backend answers).
#[inline(always)]
fn allocate(
    ctx: &XdpContext,
    cfg: &LbConfig,
    pkt: &Parsed,
    picked: &Picked,
    now: u32,
) -> Result<&'static mut NatEntry, Verdict> {
    let s = scratch()?;
    nat_state::segment(ctx, pkt, &mut s.seg)?;
    let now_ms = nat_state::now_ms();
    let half = nat_state::claim_half(cfg, &pkt.key, &mut s.okey, now_ms)?;
    match place(cfg, pkt, picked, now, half, s) {
        Ok(e) => {
            nat_state::hold_half(half, &pkt.key, now_ms);
            Ok(e)
        }
        Err(v) => {
            nat_state::drop_half(half);
            Err(v)
        }
    }
}

/// The port and both entries of [`allocate`].
#[inline(always)]
fn place(
    cfg: &LbConfig,
    pkt: &Parsed,
    picked: &Picked,
    now: u32,
    half: u32,
    s: &mut Scratch,
) -> Result<&'static mut NatEntry, Verdict> {
    let b = picked.b;
    let k = &pkt.key;
    let idle_s = if k.proto == PROTO_UDP {
        present_vip(picked.vip_id).map_or(DEFAULT_UDP_IDLE_S, |v| v.udp_idle_s)
    } else {
        cfg.nat_tcp_idle_s
    };
    // Verifier note: the entries and keys being built live in a per-CPU scratch record,
    // not on the stack (which the parse, the FIB parameters and the map keys fill).
    // Field by field: a struct literal is built on the stack and copied.
    let f = &mut s.fwd;
    f.src = b.outer_src;
    f.dst = b.addr;
    f.sport = 0;
    f.dport = if b.port != 0 { b.port } else { k.dport };
    f.backend_id = picked.id;
    f.backend_generation = b.generation;
    f.last_seen = now;
    f.flags = 0;
    f.hop_ok_len = 0;
    f.idle_s = idle_s;
    f.hop_stamp = 0;
    f.hop_ifindex = 0;
    f.hop_dmac = [0; 6];
    f.hop_smac = [0; 6];
    f.seq_end = 0;
    f.ack = 0;
    f.half_slot = half;
    nat_state::first_segment(&mut s.fwd, &s.seg, k.proto);
    // A random start, not the flow's hash: a retransmitted SYN whose ports were all taken
    // tries other ones. Ports are per (pool address, backend): the connection takes a random
    // pool address, then probes its ports (connections spread evenly, so every address fills
    // alike, and 16 probes of one address find a port as often as 16 spread over all). Picked
    // once, not per probe: a lookup per probe multiplied what the verifier walks. No pool (no
    // size written yet): the backend's outer source.
    // The backend's family, not the client's: an IPv4 VIP may have IPv6 backends.
    let fam = family_index(b.family);
    let n = pool_len(fam);
    // SAFETY: helpers without arguments.
    let h = unsafe { bpf_get_prandom_u32() };
    // The picked address's index, for the per-address refusal counts (no pool yet: the
    // family's first, which the backend's outer source then is).
    let at = nat_addr_index(fam, if n > 0 { (h >> 16) % n } else { 0 });
    if n > 0
        && let Some(a) = LB_NAT_ADDRS.get(at)
    {
        s.fwd.src = *a;
    }
    let mut i = 0;
    while i < NAT_PORT_PROBES {
        s.fwd.sport = nat_port(h, i, cfg.nat_port_min, cfg.nat_port_max).to_be();
        i += 1;
        nat_state::reverse_key(&mut s.rkey, k, &s.fwd);
        nat_state::reverse_entry(&mut s.rev, k, &s.fwd);
        match LB_NAT_REV.insert(&s.rkey, &s.rev, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(e) if e == -EEXIST => {
                if !take_expired(s, cfg, now) {
                    continue;
                }
            }
            Err(_) => return Err(refused(at, NAT_REFUSED_TABLE_FULL, TABLE_FULL)),
        }
        if LB_NAT_FWD.insert(k, &s.fwd, 0).is_err() {
            let _ = LB_NAT_REV.remove(&s.rkey);
            return Err(refused(at, NAT_REFUSED_TABLE_FULL, TABLE_FULL));
        }
        stats::count_new_flow(picked.vip_id);
        // SAFETY: the entry just written, in map memory.
        return LB_NAT_FWD
            .get_ptr_mut(k)
            .map(|p| unsafe { &mut *p })
            .ok_or(TABLE_FULL);
    }
    Err(refused(
        at,
        NAT_REFUSED_NO_PORT,
        Verdict::discard(Stat::DropNatNoPort),
    ))
}

/// Counts a new connection refused on the pool address at `at` for `reason`
/// (`lb_common::NAT_REFUSED_MAP`), and gives back the refusal's verdict.
#[inline(always)]
fn refused(at: u32, reason: u32, v: Verdict) -> Verdict {
    if let Some(c) = LB_NAT_REFUSED.get_ptr_mut(nat_refused_index(at, reason)) {
        // SAFETY: this CPU's counter; nothing else writes it meanwhile.
        unsafe { *c += 1 };
    }
    v
}

/// Takes over the port of reverse entry `rkey` if its connection has expired (its forward
/// entry, when it still names this port, goes too); false while it lives.
#[inline(always)]
fn take_expired(s: &mut Scratch, cfg: &LbConfig, now: u32) -> bool {
    // SAFETY: map memory, read in place.
    let Some(old) = (unsafe { LB_NAT_REV.get(&s.rkey) }) else {
        return false;
    };
    nat_state::forward_key(&mut s.okey, old, s.rkey.proto, s.rkey.family);
    let s = &*s;
    // The old connection's forward entry, if it still uses this port (a tuple that was
    // placed again has moved on, and keeps its new entry).
    let f = &s.fwd;
    let ofwd = unsafe { LB_NAT_FWD.get(&s.okey) }
        .filter(|o| o.src == f.src && o.sport == f.sport && o.dst == f.dst && o.dport == f.dport);
    if !nat_expired(s.rkey.proto, ofwd, Some(old), now, &cfg.nat_times()) {
        return false;
    }
    if ofwd.is_some() {
        let _ = LB_NAT_FWD.remove(&s.okey);
    }
    LB_NAT_REV.insert(&s.rkey, &s.rev, BPF_EXIST as u64).is_ok()
}

/// The answer direction's next hop from the entry's own cache when it is fresh and known to
/// fit; else the FIB's, cached (a route or neighbour change is seen within `NEXTHOP_TTL_S`).
#[inline(always)]
fn entry_hop(ctx: &XdpContext, e: &mut NatEntry, o: &Outer) -> Fib {
    let now = now_s();
    let fresh = e.hop_stamp != 0 && now.wrapping_sub(e.hop_stamp) < NEXTHOP_TTL_S;
    if fresh && o.len <= e.hop_ok_len {
        return Fib::Hop(NextHop {
            ifindex: e.hop_ifindex,
            smac: e.hop_smac,
            dmac: e.hop_dmac,
        });
    }
    let answer = fib::lookup(ctx.ctx as *mut _, o, 0);
    if let Fib::Hop(h) = &answer {
        e.hop_ok_len = if fresh {
            e.hop_ok_len.max(o.len)
        } else {
            o.len
        };
        e.hop_stamp = now.max(1);
        e.hop_ifindex = h.ifindex;
        e.hop_smac = h.smac;
        e.hop_dmac = h.dmac;
    }
    answer
}

/// Sends `pkt` rewritten to `to`: next hop by the FIB (cached per backend for the forward
/// direction), then the rewrite, then out.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    pkt: &Parsed,
    to: &mut NatEntry,
    picked: Option<&Picked>,
) -> Result<Verdict, Verdict> {
    let ingress = ctx.ingress_ifindex() as u32;
    let o = Outer {
        family: pkt.key.family,
        proto: pkt.key.proto,
        src: to.src,
        dst: to.dst,
        sport: to.sport,
        dport: to.dport,
        len: pkt.ip.len as u16,
        tos: pkt.ip.tos,
        ifindex: ingress,
    };
    let hop = match picked {
        Some(p) => next_hop(ctx, p.id, p.b, &o),
        None => entry_hop(ctx, to, &o),
    };
    let next = match hop {
        Fib::Hop(h) => Some(h),
        Fib::NoNeighbour => None,
        // NAT never grows a packet: only a smaller egress MTU than the ingress one does this.
        Fib::TooBig(_) => return Err(Verdict::discard(Stat::DropTooBig)),
        Fib::Fail(stat) => return Err(Verdict::discard(stat)),
    };
    if pkt.icmp_error {
        rewrite_icmp(ctx, pkt, to)?;
    } else {
        rewrite(ctx, pkt, to)?;
    }
    let Some(h) = next else {
        // The kernel resolves the neighbour and forwards the rewritten packet.
        return Ok(Verdict::pass(Stat::PassNoNeighbour));
    };
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(BROKEN)?;
    // SAFETY: checked by `ptr_at_mut`.
    unsafe {
        (*eth).dst_addr = h.dmac;
        (*eth).src_addr = h.smac;
    }
    if h.ifindex == ingress {
        return Ok(Verdict::forward(xdp_action::XDP_TX));
    }
    LB_TX_PORTS
        .redirect(h.ifindex, 0)
        .map(Verdict::forward)
        .map_err(|_| Verdict::discard(Stat::DropTxError))
}
