//! The decap object's benchmark harness (`lb-ebpf`'s `bench` feature; never attached, never
//! in the product object).
use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

use crate::{
    decap_xdp,
    ptr::{ptr_at, ptr_at_mut},
};

/// Benchmark harness (never attached): the decap program, then the frame put back as it came
/// (the outer headers restored from the saved first `BENCH_SAVED` bytes), so `repeat` passes
/// measure the same tunnel packet, whether it was stripped or forwarded (rewritten in place).
/// The restore is included in its time. Frames must be at least that long.
#[xdp]
pub fn bench_decap(ctx: XdpContext) -> u32 {
    let Some(head) = ptr_at::<[u8; BENCH_SAVE]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // Saved in a per-CPU map: the program's own stack leaves no room for it.
    let Some(saved) = BENCH_SAVED.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds-checked above; this CPU's slot.
    unsafe { *saved = *head };
    let before = ctx.data_end() - ctx.data();
    let action = decap_xdp_call(&ctx);
    let cut = before as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: helper on our own context; pointers re-derived after.
    if cut > 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, -cut) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(head) = ptr_at_mut::<[u8; BENCH_SAVE]>(&ctx, 0) {
        // SAFETY: bounds-checked by `ptr_at_mut`; this CPU's slot.
        unsafe { *head = *saved };
    }
    action
}

/// The decap program as a BPF-to-BPF call for the harness: inlined into the harness, LLVM
/// merged registers across paths (a packet-end pointer into offset arithmetic) in a way the
/// verifier refuses; the attached programs are unaffected.
#[inline(never)]
fn decap_xdp_call(ctx: &XdpContext) -> u32 {
    decap_xdp(ctx).1
}

/// Ethernet, outer IPv6, UDP and a GUE header with one IPv6 hop (86 bytes), rounded up.
const BENCH_SAVE: usize = 96;

#[map(name = "BENCH_SAVED")]
static BENCH_SAVED: PerCpuArray<[u8; BENCH_SAVE]> = PerCpuArray::with_max_entries(1, 0);
