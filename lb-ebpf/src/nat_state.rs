//! NAT connection state: the half-open slots a new connection takes, and what each packet of
//! a known pair may change (its sequence state; the handshake, FINs and RSTs only in window).
//! The rules are `lb_common::nat`'s pure functions; here they meet the maps.
//!
//! Cost: a packet that changes nothing (data, pure ACKs of an established pair) reads its
//! sequence numbers and moves its own entry's; only a packet that may change the pair's
//! state (a RST, a FIN, the handshake's ACK, the backend's first answer, the client's last
//! ACK) looks up the other direction's entry.
// Keys go to the map helpers by reference: by value they would be copied onto the stack.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    FlowKey, LbConfig, NAT_F_ACKED, NAT_F_ANSWERED, NAT_F_BACKEND_FIN, NAT_F_CLIENT_FIN,
    NAT_F_CLIENT_FIRST, NAT_F_ESTABLISHED, NAT_F_LAST_ACK, NAT_F_REPLY, NAT_F_RST, NAT_F_SEEN,
    NAT_F_STATE, NAT_HALF_NONE, NAT_HALF_PROBES, NAT_HALF_YOUNG_MS, NatEntry, PROTO_TCP, Stat,
    TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpSeg, nat_half_at, nat_half_hashes, nat_seq_ok,
    nat_track,
};
use network_types::tcp::TcpHdr;

use crate::{
    Verdict,
    maps::{LB_NAT_FWD, LB_NAT_HALF, LB_NAT_REV},
    parse::{Parsed, ptr_at_mut},
    stats,
};

const OUT_OF_WINDOW: Verdict = Verdict::discard(Stat::DropNatOutOfWindow);
const BROKEN: Verdict = Verdict::discard(Stat::DropMalformed);

/// Coarse monotonic milliseconds, wrapping (half-open slot ages).
#[inline(always)]
pub fn now_ms() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000) as u32
}

/// Whether the packet may open a connection: a TCP SYN alone, or any UDP datagram (a UDP
/// flow's first datagram is whichever finds no entry).
#[inline(always)]
pub fn opens(pkt: &Parsed) -> bool {
    pkt.key.proto != PROTO_TCP || pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// The TCP segment's sequence facts, into `out` (left as they are for UDP).
#[inline(always)]
pub fn segment(ctx: &XdpContext, pkt: &Parsed, out: &mut TcpSeg) -> Result<(), Verdict> {
    if pkt.key.proto != PROTO_TCP {
        return Ok(());
    }
    // Verifier note: offsets re-bounded after travelling through the struct.
    let l4 = pkt.ip.l4 & 0x7f;
    let t: *mut TcpHdr = ptr_at_mut(ctx, l4).ok_or(BROKEN)?;
    // SAFETY: checked by `ptr_at_mut`; byte 12 is inside the 20 checked.
    let doff = unsafe {
        out.seq = u32::from_be_bytes((*t).seq);
        out.ack = u32::from_be_bytes((*t).ack_seq);
        (*(t as *const u8).add(12) >> 4) as usize * 4
    };
    // The parse checked the data offset against the IP length.
    let payload = (pkt.ip.l3 + pkt.ip.len).saturating_sub(pkt.ip.l4 + doff) as u32;
    let f = pkt.tcp_flags;
    let extra = u32::from(f & TCP_SYN != 0) + u32::from(f & TCP_FIN != 0);
    out.end = out.seq.wrapping_add(payload + extra);
    out.flags = f;
    Ok(())
}

/// Writes into `out` the reverse key of forward translation `to` of `from` (as
/// `nat_reverse`), field by field: a key built by value and copied costs stack the NAT
/// program does not have.
#[inline(always)]
pub fn reverse_key(out: &mut FlowKey, from: &FlowKey, to: &NatEntry) {
    out.src = to.dst;
    out.dst = to.src;
    out.sport = to.dport;
    out.dport = to.sport;
    out.proto = from.proto;
    out.family = from.family;
    out._pad = [0; 2];
}

/// Writes into `out` the forward key reverse entry `rev` stands for (as `nat_forward_key`).
#[inline(always)]
pub fn forward_key(out: &mut FlowKey, rev: &NatEntry, proto: u8, family: u8) {
    out.src = rev.dst;
    out.dst = rev.src;
    out.sport = rev.dport;
    out.dport = rev.sport;
    out.proto = proto;
    out.family = family;
    out._pad = [0; 2];
}

/// Writes into `out` the reverse entry of forward translation `to` of `from` (as
/// `nat_reverse`, in place): the backend's answer gets VIP -> client.
#[inline(always)]
pub fn reverse_entry(out: &mut NatEntry, from: &FlowKey, to: &NatEntry) {
    out.src = from.dst;
    out.dst = from.src;
    out.sport = from.dport;
    out.dport = from.sport;
    out.backend_id = to.backend_id;
    out.backend_generation = to.backend_generation;
    out.last_seen = to.last_seen;
    out.flags = NAT_F_REPLY | (to.flags & NAT_F_STATE);
    out.idle_s = to.idle_s;
    // Another direction, another next hop: asked on its first packet.
    out.hop_ok_len = 0;
    out.hop_stamp = 0;
    out.hop_ifindex = 0;
    out.hop_dmac = [0; 6];
    out.hop_smac = [0; 6];
    out.seq_end = 0;
    out.ack = 0;
    out.half_slot = NAT_HALF_NONE;
}

/// Adds state bits `add` to both entries of a pair (their last-seen follows: a state change
/// is a packet).
#[inline(always)]
fn set_both(a: &mut NatEntry, b: &mut NatEntry, add: u16, now: u32) {
    a.flags |= add;
    b.flags |= add;
    a.last_seen = now;
}

/// Gives the pair's half-open slot back (it is established): the slot is free for another
/// connection at once.
#[inline(always)]
fn release_half(fwd: &mut NatEntry, fkey: &FlowKey) {
    let i = fwd.half_slot;
    if i == NAT_HALF_NONE {
        return;
    }
    fwd.half_slot = NAT_HALF_NONE;
    if let Some(s) = LB_NAT_HALF.get_ptr_mut(i) {
        // SAFETY: map memory; a racing CPU writes a whole slot of its own.
        let s = unsafe { &mut *s };
        if s.key.same(fkey) {
            s.stamp_ms = 0;
        }
    }
}

/// A client's packet on its pair's forward entry `e` (TCP): tracked; a RST or FIN obeyed only
/// in window (else dropped); the handshake's ACK makes the pair established; the client's
/// ACK of the backend's FIN after closing first frees the port early. `okey` is work space.
#[inline(always)]
pub fn client(
    pkt: &Parsed,
    seg: &TcpSeg,
    e: &mut NatEntry,
    okey: &mut FlowKey,
    now: u32,
) -> Result<(), Verdict> {
    if pkt.key.proto != PROTO_TCP {
        return Ok(());
    }
    let f = seg.flags;
    let handshake = e.flags & NAT_F_ESTABLISHED == 0 && f & (TCP_ACK | TCP_SYN) == TCP_ACK;
    let last_ack = e.flags & (NAT_F_CLIENT_FIRST | NAT_F_BACKEND_FIN | NAT_F_LAST_ACK)
        == NAT_F_CLIENT_FIRST | NAT_F_BACKEND_FIN;
    if f & (TCP_RST | TCP_FIN) == 0 && !handshake && !last_ack {
        nat_track(e, seg);
        return Ok(());
    }
    reverse_key(okey, &pkt.key, e);
    let Some(r) = LB_NAT_REV.get_ptr_mut(&*okey) else {
        // The pair's other half is gone (expired, port taken over): nothing to keep in step.
        nat_track(e, seg);
        return Ok(());
    };
    // SAFETY: map memory, valid while the program runs.
    let r = unsafe { &mut *r };
    if f & TCP_RST != 0 {
        if !nat_seq_ok(seg, e, r) {
            return Err(OUT_OF_WINDOW);
        }
        set_both(e, r, NAT_F_RST, now);
        return Ok(());
    }
    if f & TCP_FIN != 0 {
        if !nat_seq_ok(seg, e, r) {
            return Err(OUT_OF_WINDOW);
        }
        let mut add = NAT_F_CLIENT_FIN;
        if (e.flags | r.flags) & NAT_F_BACKEND_FIN == 0 {
            add |= NAT_F_CLIENT_FIRST;
        }
        set_both(e, r, add, now);
    }
    nat_track(e, seg);
    if f & TCP_ACK == 0 {
        return Ok(());
    }
    let acks_backend = r.flags & NAT_F_SEEN != 0 && seg.ack == r.seq_end;
    if e.flags & NAT_F_ESTABLISHED == 0 && (acks_backend || r.flags & NAT_F_ESTABLISHED != 0) {
        set_both(e, r, NAT_F_ESTABLISHED, now);
        release_half(e, &pkt.key);
    }
    let flags = e.flags | r.flags;
    if acks_backend
        && flags & (NAT_F_CLIENT_FIRST | NAT_F_BACKEND_FIN)
            == NAT_F_CLIENT_FIRST | NAT_F_BACKEND_FIN
    {
        set_both(e, r, NAT_F_LAST_ACK, now);
    }
    Ok(())
}

/// A backend's packet on its pair's reverse entry `e`: tracked; its first answer must
/// acknowledge the client's SYN (a half-open pair) and marks the pair answered (a UDP pair:
/// established); a RST or FIN is obeyed only in window (else dropped). `okey` is work space.
#[inline(always)]
pub fn backend(
    pkt: &Parsed,
    seg: &TcpSeg,
    e: &mut NatEntry,
    okey: &mut FlowKey,
    now: u32,
) -> Result<(), Verdict> {
    let tcp = pkt.key.proto == PROTO_TCP;
    let f = seg.flags;
    let first = e.flags & NAT_F_ANSWERED == 0 || (tcp && e.flags & NAT_F_SEEN == 0);
    if !first && f & (TCP_RST | TCP_FIN) == 0 {
        if tcp {
            nat_track(e, seg);
        }
        return Ok(());
    }
    forward_key(okey, e, pkt.key.proto, pkt.key.family);
    let Some(c) = LB_NAT_FWD.get_ptr_mut(&*okey) else {
        if tcp {
            nat_track(e, seg);
        }
        return Ok(());
    };
    // SAFETY: map memory, valid while the program runs.
    let c = unsafe { &mut *c };
    if !tcp {
        set_both(e, c, NAT_F_ANSWERED | NAT_F_ESTABLISHED, now);
        release_half(c, okey);
        return Ok(());
    }
    if f & TCP_RST != 0 {
        if !nat_seq_ok(seg, e, c) {
            return Err(OUT_OF_WINDOW);
        }
        set_both(e, c, NAT_F_RST, now);
        return Ok(());
    }
    if e.flags & NAT_F_SEEN == 0 && (e.flags | c.flags) & NAT_F_ESTABLISHED == 0 {
        // The first answer of a half-open pair acknowledges the client's SYN exactly.
        if f & TCP_ACK == 0 || c.flags & NAT_F_SEEN == 0 {
            return Err(OUT_OF_WINDOW);
        }
        if seg.ack != c.seq_end {
            return Err(stale_port(c, okey, &pkt.key));
        }
    } else if f & TCP_FIN != 0 && !nat_seq_ok(seg, e, c) {
        return Err(OUT_OF_WINDOW);
    }
    let mut add = NAT_F_ANSWERED;
    if f & TCP_FIN != 0 {
        add |= NAT_F_BACKEND_FIN;
        // The backend closes passively (no TIME_WAIT) only when its FIN acknowledges the
        // client's: a FIN sent before the client's arrived (a simultaneous close) leaves it in
        // TIME_WAIT, whichever FIN the load balancer saw first.
        if (e.flags | c.flags) & NAT_F_CLIENT_FIRST != 0
            && (f & TCP_ACK == 0 || seg.ack != c.seq_end)
        {
            e.flags &= !NAT_F_CLIENT_FIRST;
            c.flags &= !NAT_F_CLIENT_FIRST;
        }
    }
    if e.flags & add != add {
        set_both(e, c, add, now);
    }
    nat_track(e, seg);
    Ok(())
}

/// The backend answered a new connection's SYN with an ACK of another one: it still holds an
/// earlier connection on this NAT port (a handshake of a replaced half-open pair, a
/// TIME_WAIT), and would answer every retransmission of this SYN the same way until its own
/// timers end it. The pair is removed (port and slot freed) so the client's next SYN takes
/// another port; the backend's leftover ends by itself. `fwd` is the pair's forward entry,
/// found under `fkey`; `rkey` is the packet's (reverse) key.
#[inline(always)]
fn stale_port(fwd: &mut NatEntry, fkey: &FlowKey, rkey: &FlowKey) -> Verdict {
    release_half(fwd, fkey);
    let _ = LB_NAT_REV.remove(rkey);
    let _ = LB_NAT_FWD.remove(fkey);
    Verdict::discard(Stat::DropNatStalePort)
}

/// Takes a half-open slot for new connection `key`: a free one of the probes, else the
/// oldest one held longer than `NAT_HALF_YOUNG_MS`, whose pair (still half-open) is removed.
/// Every probe young: refused. The slot is written by [`hold_half`] once the pair exists.
#[inline(always)]
pub fn claim_half(
    cfg: &LbConfig,
    key: &FlowKey,
    okey: &mut FlowKey,
    now: u32,
) -> Result<u32, Verdict> {
    let hashes = nat_half_hashes(key);
    let (slots, share) = (cfg.nat_half_slots, cfg.nat_half_share);
    let mut best = NAT_HALF_NONE;
    let mut best_age = 0u32;
    let mut i = 0;
    while i < NAT_HALF_PROBES {
        let idx = nat_half_at(hashes, i, slots, share);
        i += 1;
        let Some(s) = LB_NAT_HALF.get(idx) else {
            continue;
        };
        if s.stamp_ms == 0 {
            best = idx;
            break;
        }
        let age = now.wrapping_sub(s.stamp_ms);
        if age >= NAT_HALF_YOUNG_MS && age >= best_age {
            best = idx;
            best_age = age;
        }
    }
    if best == NAT_HALF_NONE {
        return Err(Verdict::discard(Stat::DropNatHalfOpenFull));
    }
    let s = LB_NAT_HALF
        .get_ptr_mut(best)
        .ok_or(Verdict::discard(Stat::DropNatHalfOpenFull))?;
    // SAFETY: map memory, valid while the program runs.
    let s = unsafe { &mut *s };
    if s.stamp_ms != 0 {
        replace_half(&s.key, best, okey);
    }
    // Held (not yet ours): a racing CPU probing it now sees it young.
    s.stamp_ms = now.max(1);
    Ok(best)
}

/// Removes the half-open pair of client tuple `old` that holds slot `idx`, if it is still
/// half-open there (an established pair gave its slot back; a gone one has nothing left).
#[inline(always)]
fn replace_half(old: &FlowKey, idx: u32, okey: &mut FlowKey) {
    // SAFETY: map memory, read in place.
    let Some(of) = (unsafe { LB_NAT_FWD.get(old) }) else {
        return;
    };
    if of.half_slot != idx || of.flags & NAT_F_ESTABLISHED != 0 {
        return;
    }
    reverse_key(okey, old, of);
    // The reverse entry only while it still stands for this tuple (its port may have been
    // taken over since).
    // SAFETY: map memory, read in place.
    if let Some(r) = unsafe { LB_NAT_REV.get(&*okey) }
        && r.dport == old.sport
        && r.dst == old.src
        && r.flags & NAT_F_ESTABLISHED == 0
    {
        let _ = LB_NAT_REV.remove(&*okey);
    }
    let _ = LB_NAT_FWD.remove(old);
    stats::count(Stat::NatHalfOpenReplaced, 0);
}

/// Records new connection `key` in the slot [`claim_half`] gave it.
#[inline(always)]
pub fn hold_half(idx: u32, key: &FlowKey, now: u32) {
    if let Some(s) = LB_NAT_HALF.get_ptr_mut(idx) {
        // SAFETY: map memory, valid while the program runs.
        unsafe {
            (*s).key = *key;
            (*s).stamp_ms = now.max(1);
        }
    }
}

/// Frees a slot [`claim_half`] gave a connection that then found no port or no room.
#[inline(always)]
pub fn drop_half(idx: u32) {
    if let Some(s) = LB_NAT_HALF.get_ptr_mut(idx) {
        // SAFETY: map memory, valid while the program runs.
        unsafe { (*s).stamp_ms = 0 };
    }
}

/// The state bits a new pair starts with: none (half-open), and this direction's sequence
/// state from its first segment.
#[inline(always)]
pub fn first_segment(e: &mut NatEntry, seg: &TcpSeg, proto: u8) {
    e.flags &= !(NAT_F_STATE | NAT_F_SEEN | NAT_F_ACKED);
    if proto == PROTO_TCP {
        nat_track(e, seg);
    }
}
