//! Benchmark harnesses, never attached. BPF_PROG_TEST_RUN with `repeat` feeds each pass the
//! previous pass's output, so a new-flow benchmark needs every pass to carry a new flow:
//! these programs move the frame to the next client (source port, then source address) after
//! running the load balancer. They expect an untagged IPv4 TCP frame with a 20-byte header.
//!
//! The harnesses that run the load balancer are `xdp.frags` like `lb_xdp`: the NAT program
//! array takes only programs of its first user's kind, and loading a plain XDP program that
//! tail-calls through it fails with EINVAL.
use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

use crate::parse::ptr_at_mut;

const SADDR_LOW: usize = 14 + 14; // last two bytes of the IPv4 source address
const SPORT: usize = 14 + 20;

/// Advances the frame's (source address, source port) to the next client.
#[inline(always)]
fn next_client(ctx: &XdpContext) {
    let (Some(port), Some(addr)) = (
        ptr_at_mut::<[u8; 2]>(ctx, SPORT),
        ptr_at_mut::<[u8; 2]>(ctx, SADDR_LOW),
    ) else {
        return;
    };
    // SAFETY: both pointers were bounds-checked by `ptr_at_mut`.
    unsafe {
        let p = u16::from_be_bytes(*port).wrapping_add(1);
        *port = p.to_be_bytes();
        if p == 0 {
            *addr = u16::from_be_bytes(*addr).wrapping_add(1).to_be_bytes();
        }
    }
}

/// The load balancer, then the next client: every pass is a new flow.
#[xdp(frags)]
pub fn bench_lb_new_flow(ctx: XdpContext) -> u32 {
    let action = crate::path::lb(&ctx);
    next_client(&ctx);
    action
}

/// The harness alone: its cost is included in `bench_lb_new_flow`'s.
#[xdp]
pub fn bench_next_client(ctx: XdpContext) -> u32 {
    next_client(&ctx);
    xdp_action::XDP_PASS
}

/// Parsing alone: every header an established packet's path reads (and the VIP-address
/// bitmap, which `parse` consults). For the "where the time goes" rows.
#[xdp]
pub fn bench_parse(ctx: XdpContext) -> u32 {
    // The outcome depends on every check, so no part of the parse is optimised away.
    let mut p = crate::parse::Parsed::EMPTY;
    if crate::parse::parse(&ctx, &mut p).is_ok() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Parsing and the established flow-table lookup, nothing else.
#[xdp]
pub fn bench_parse_lookup(ctx: XdpContext) -> u32 {
    let mut p = crate::parse::Parsed::EMPTY;
    if crate::parse::parse(&ctx, &mut p).is_err() {
        return xdp_action::XDP_DROP;
    }
    let cfg = crate::maps::config();
    match crate::maps::established(cfg, &crate::maps::table_key(cfg, &p.key)) {
        Some(_) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_DROP,
    }
}

/// Parsing and a probe of this CPU's flow-cache slot (the key compare), nothing else: what
/// the cache adds to a packet it does not serve.
#[xdp]
pub fn bench_parse_cache(ctx: XdpContext) -> u32 {
    let mut p = crate::parse::Parsed::EMPTY;
    if crate::parse::parse(&ctx, &mut p).is_err() {
        return xdp_action::XDP_DROP;
    }
    let cfg = crate::maps::config();
    let Some(slot) = crate::maps::flow_cache(cfg, &p.key) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot in map memory, compared in place.
    if unsafe { (*slot).holds(&p.key) } {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Parsing and a probe of the probation table (hash, slot, key compare), nothing else.
#[xdp]
pub fn bench_parse_probation(ctx: XdpContext) -> u32 {
    let mut p = crate::parse::Parsed::EMPTY;
    if crate::parse::parse(&ctx, &mut p).is_err() {
        return xdp_action::XDP_DROP;
    }
    let cfg = crate::maps::config();
    let h = lb_common::probation_hash(&p.key);
    match crate::maps::on_probation(cfg, &p.key, h) {
        Some(_) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_DROP,
    }
}

/// Parsing and placement by the live slot table (VIP index, VIP, flow hash, slot, backend),
/// nothing else: the stateless path without the NAT check, counters or rewrite.
#[xdp]
pub fn bench_place(ctx: XdpContext) -> u32 {
    let mut p = crate::parse::Parsed::EMPTY;
    if crate::parse::parse(&ctx, &mut p).is_err() {
        return xdp_action::XDP_DROP;
    }
    let cfg = crate::maps::config();
    match crate::select::slot_backend(&p, cfg) {
        Ok(_) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_DROP,
    }
}

/// Bytes the encapsulation harness saves and restores: Ethernet and the largest outer header
/// (IPv6 + UDP), rounded up.
const SAVED: usize = 64;

/// The load balancer on an encapsulated backend's flow, then the frame put back as it came
/// (the saved first bytes restored after removing the outer header), so `repeat` passes
/// measure the same packet. The restore (a head adjustment and a 64-byte copy) is included.
#[xdp(frags)]
pub fn bench_lb_encap(ctx: XdpContext) -> u32 {
    let Some(head) = crate::ptr::ptr_at::<[u8; SAVED]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // Saved in a per-CPU map: the load balancer's own stack leaves no room for 64 bytes.
    let Some(saved) = BENCH_SAVED.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds-checked above; this CPU's slot.
    unsafe { *saved = *head };
    let before = ctx.data_end() - ctx.data();
    let action = lb_call(&ctx);
    let grown = (ctx.data_end() - ctx.data()) as i32 - before as i32;
    // SAFETY: helper on our own context; pointers re-derived after.
    if grown > 0 && unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, grown) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(head) = ptr_at_mut::<[u8; SAVED]>(&ctx, 0) {
        // SAFETY: bounds-checked by `ptr_at_mut`; this CPU's slot.
        unsafe { *head = *saved };
    }
    action
}

/// The load balancer as a call of its own: its frame and the harness's never add up beyond
/// what the verifier allows one call chain.
#[inline(never)]
fn lb_call(ctx: &XdpContext) -> u32 {
    crate::path::lb(ctx)
}

#[map(name = "BENCH_SAVED")]
static BENCH_SAVED: PerCpuArray<[u8; SAVED]> = PerCpuArray::with_max_entries(1, 0);

/// One entry of [`BENCH_BARE`]: an IPv4 TCP flow's addresses and ports, and the MACs to
/// write (destination, source).
#[repr(C)]
#[derive(Clone, Copy)]
struct BareEntry {
    src: u32,
    dst: u32,
    ports: u32,
    macs: [u16; 6],
    _pad: [u8; 4],
}

const BARE_SLOTS: u32 = 1024;

/// Bench-only flow array for [`bench_bare`].
#[map(name = "BENCH_BARE")]
static BENCH_BARE: aya_ebpf::maps::Array<BareEntry> =
    aya_ebpf::maps::Array::with_max_entries(BARE_SLOTS, 0);

/// A 16-bit word of the frame at an even offset (checked by the caller's bound).
///
/// # Safety
/// `p + off + 2` is inside the frame and `p + off` is even.
#[inline(always)]
unsafe fn bare16(p: *const u8, off: usize) -> u32 {
    // SAFETY: the caller's.
    u32::from(unsafe { core::ptr::read(p.add(off) as *const u16) })
}

/// The least any flow-keeping L4 balancer does for an established IPv4 TCP packet, for the
/// "how close to the kernel's floor" row: one bound check, the Ethernet type, version and
/// header length, not a fragment, TCP; the 12-byte tuple; one multiply-shift hash into one
/// inlined array read; a 3-word compare; both MACs written; XDP_TX. No VLAN, IPv6, options,
/// TCP flags, validity of VIP or backend, counters, drain or down. The first pass fills the
/// slot (XDP_PASS); every later pass of the same frame is a hit.
#[xdp]
pub fn bench_bare(ctx: XdpContext) -> u32 {
    const BARE_LEN: usize = 14 + 20 + 20;
    let Some(h) = ptr_at_mut::<[u8; BARE_LEN]>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let p = h as *const u8;
    // SAFETY: all offsets below are inside the 54 bounds-checked bytes, 16-bit ones even.
    unsafe {
        // Ethernet type 0x0800 (as a little-endian word), IHL 5 version 4, TCP, and neither
        // more-fragments nor an offset.
        if bare16(p, 12) != 0x0008
            || *p.add(14) != 0x45
            || *p.add(23) != 6
            || bare16(p, 20) & 0xff3f != 0
        {
            return xdp_action::XDP_PASS;
        }
        let src = bare16(p, 26) | (bare16(p, 28) << 16);
        let dst = bare16(p, 30) | (bare16(p, 32) << 16);
        let ports = bare16(p, 34) | (bare16(p, 36) << 16);
        let mixed = (u64::from(src) << 32 | u64::from(dst)) ^ u64::from(ports);
        let slot = (mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as u32 & (BARE_SLOTS - 1);
        let Some(e) = BENCH_BARE.get_ptr_mut(slot) else {
            return xdp_action::XDP_ABORTED;
        };
        if (*e).src != src || (*e).dst != dst || (*e).ports != ports {
            *e = BareEntry {
                src,
                dst,
                ports,
                macs: [1, 2, 3, 4, 5, 6],
                _pad: [0; 4],
            };
            return xdp_action::XDP_PASS;
        }
        let to = p as *mut u16;
        let from = &raw const (*e).macs as *const u16;
        let mut i = 0;
        while i < 6 {
            core::ptr::write_volatile(to.add(i), core::ptr::read_volatile(from.add(i)));
            i += 1;
        }
    }
    xdp_action::XDP_TX
}

/// The pre-filter alone (Ethernet, VLAN, IP destination, VIP-address bitmap), without the
/// counter a non-VIP packet then gets: what that counter costs.
#[xdp]
pub fn bench_prefilter(ctx: XdpContext) -> u32 {
    match crate::parse::prefilter(&ctx) {
        Ok(_) => xdp_action::XDP_DROP,
        Err(_) => xdp_action::XDP_PASS,
    }
}

/// How far [`staged`] follows an established packet's path (each stage includes those
/// before it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// The pre-filter and the express lane's read of the frame (`parse::plain_v4`).
    Parse,
    /// This CPU's cache slot: CPU id, index, key compare and tick.
    Cache,
    /// The entry still decides (VIP, backend, the rules) and the hit is counted.
    Decide,
    /// The MACs rewritten, XDP_TX (or a redirect).
    Forward,
    /// The VIP, backend and reason counters: all of `lb_xdp`'s work on this packet.
    Count,
}

/// An established IPv4 packet's path through the express lane (`express`) and this CPU's
/// flow cache, up to `upto`, built from the product's own functions, for the "where an
/// established packet's time goes" rows. A slot that does not hold the flow in this tick is
/// filled from the established table (once a tick, as the product does) and the pass
/// returns XDP_PASS; a hit returns XDP_TX (`Stage::Parse`: XDP_PASS once parsed).
#[inline(always)]
fn staged(ctx: &XdpContext, upto: Stage) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Ok(crate::parse::Candidate::V4 { l3, dst }) = crate::parse::prefilter(ctx) else {
        return xdp_action::XDP_DROP;
    };
    let Some(p) = crate::parse::plain_v4(ctx, l3, dst[0]) else {
        return xdp_action::XDP_DROP;
    };
    if upto == Stage::Parse {
        return xdp_action::XDP_PASS;
    }
    let cfg = crate::maps::config();
    let Some(slot) = crate::maps::flow_cache_of(cfg, &p.words) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot, as in `select::cache_decides`.
    let c = unsafe { &*slot };
    // Stage 2 stops at the slot; the later stages take the product's decision, which makes
    // the same two checks first (not made twice here, or those stages would time them twice).
    let decided = if upto == Stage::Cache {
        (c.holds_words(&p.words) && c.filled_in(crate::select::tick())).then_some(None)
    } else {
        crate::select::cache_decides(slot, &p.words).map(Some)
    };
    let Some(decided) = decided else {
        let key = lb_common::FlowKey::from_words(p.words);
        if let Some(e) = crate::maps::established(cfg, &crate::maps::table_key(cfg, &key)) {
            // SAFETY: the map's value, valid while this program runs.
            crate::maps::cache_fill(slot, &key, unsafe { &*e }, crate::select::tick());
            return xdp_action::XDP_PASS;
        }
        return xdp_action::XDP_DROP;
    };
    let Some((flow, b)) = decided else {
        return xdp_action::XDP_TX;
    };
    crate::stats::count_flow(lb_common::FlowEvent::Hit);
    if upto == Stage::Decide {
        return xdp_action::XDP_TX;
    }
    let Ok(v) = crate::forward::l2_dsr(ctx, b) else {
        return xdp_action::XDP_DROP;
    };
    if upto == Stage::Count {
        crate::stats::count_vip(flow.vip_id, len, false);
        crate::stats::count_backend(flow.backend_id, len);
        crate::stats::count(v.stat, len);
    }
    v.action
}

#[xdp(frags)]
pub fn bench_stage_parse(ctx: XdpContext) -> u32 {
    staged(&ctx, Stage::Parse)
}

#[xdp(frags)]
pub fn bench_stage_cache(ctx: XdpContext) -> u32 {
    staged(&ctx, Stage::Cache)
}

#[xdp(frags)]
pub fn bench_stage_decide(ctx: XdpContext) -> u32 {
    staged(&ctx, Stage::Decide)
}

#[xdp(frags)]
pub fn bench_stage_forward(ctx: XdpContext) -> u32 {
    staged(&ctx, Stage::Forward)
}

#[xdp(frags)]
pub fn bench_stage_count(ctx: XdpContext) -> u32 {
    staged(&ctx, Stage::Count)
}
