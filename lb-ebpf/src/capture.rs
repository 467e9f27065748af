//! Packet capture (`lb capture`, `lb_common::capture`): the frame as it arrived, and as it
//! left, with the verdict, into a ring buffer the agent reads.
//!
//! Its shape keeps it off the hot path and out of the verifier's way:
//! - `lb_xdp` reads one flag ([`running`]); only when it is set does it copy the frame's
//!   first bytes to this CPU's record ([`arrive`]) and send the frame by the full path's
//!   captured copy (`lb_full_capture`, [`enter_full`]), so neither the express lane nor
//!   `lb_full` carries a capture hook (the verifier walks `lb_full` as before);
//! - `lb_full_capture` and `lb_nat` (after its one check), where every verdict of a captured
//!   frame is made, hand the verdict over in the per-CPU record and tail-call `lb_capture`
//!   ([`leave`]): the filters, the sampling, the rate limit and the ring's output are
//!   verified once, in a program of their own, not at every verdict of the large programs.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, PerCpuArray, ProgramArray, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    CAPTURE_ARRIVED, CAPTURE_F_BOTH, CAPTURE_FULL, CAPTURE_LEFT, CAPTURE_NONE, CAPTURE_RECORD,
    CAPTURE_RING_BYTES, CaptureConfig, CaptureCpu, CaptureRate, FlowKey, NatEntry, Stat,
};
use lb_ebpf::capture_core::{admit, copy_frame, output};

use crate::{Verdict, maps::find_vip_id, parse::Parsed};

/// See `lb_common::CAPTURE_CONFIG_MAP`.
#[map(name = "LB_CAPTURE")]
static LB_CAPTURE: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// See `lb_common::CAPTURE_CPU_MAP`.
#[map(name = "LB_CAPTURE_CPU")]
static LB_CAPTURE_CPU: PerCpuArray<CaptureCpu> = PerCpuArray::with_max_entries(1, 0);

/// See `lb_common::CAPTURE_RATE_MAP`.
#[map(name = "LB_CAPTURE_RATE")]
static LB_CAPTURE_RATE: Array<CaptureRate> = Array::with_max_entries(1, 0);

/// See `lb_common::CAPTURE_RING_MAP`.
#[map(name = "LB_CAPTURE_RING")]
static LB_CAPTURE_RING: RingBuf = RingBuf::with_byte_size(CAPTURE_RING_BYTES, 0);

/// Holds `lb_capture` ([`CAPTURE_RECORD`]) and `lb_full_capture` ([`CAPTURE_FULL`]); the
/// agent enters them at load.
#[map(name = "LB_CAPTURE_PROGS")]
static LB_CAPTURE_PROGS: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Set (non-zero) by the agent while a capture runs (`lb_common::CAPTURE_ON_GLOBAL`). A
/// mutable global, in the object's `.bss` map: the program reads it at a constant address,
/// one load and one branch, where a map lookup costs a call and its checks.
#[unsafe(no_mangle)]
static mut LB_CAPTURE_ON: u32 = 0;

/// Whether a capture runs: the one read and branch the hot path pays.
#[inline(always)]
pub fn running() -> bool {
    // SAFETY: a plain word the agent writes whole; read fresh on every packet.
    unsafe { core::ptr::read_volatile(&raw const LB_CAPTURE_ON) != 0 }
}

/// A capture runs: `lb_xdp` sends the frame to `lb_full_capture`, the full path with the
/// capture's hooks (a copy of its own, so `lb_full` carries none). Returns when the tail
/// call failed (the agent that filled the array is gone): the frame then goes on as usual.
#[inline(always)]
pub fn enter_full(ctx: &XdpContext) {
    // SAFETY: tail call into our own program array; on success it does not return.
    unsafe { LB_CAPTURE_PROGS.tail_call(ctx, CAPTURE_FULL) };
}

/// This CPU's capture state.
#[inline(always)]
fn this_cpu() -> Option<&'static mut CaptureCpu> {
    // SAFETY: this CPU's value; an XDP program is not preempted on its CPU, and the agent
    // only reads it (or zeroes it before a capture starts).
    LB_CAPTURE_CPU.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// A capture runs: keeps the frame's first bytes as it arrived, before anything rewrites it.
/// Inlined: a BPF-to-BPF call beside tail calls would cap every frame's stack.
#[inline(always)]
pub fn arrive(ctx: &XdpContext) {
    let (Some(cfg), Some(cpu)) = (LB_CAPTURE.get(0), this_cpu()) else {
        return;
    };
    let (len, n) = copy_frame(ctx.ctx, cpu, cfg.snaplen);
    cpu.rec.hdr.orig_len = len;
    cpu.rec.hdr.cap_len = n;
    cpu.rec.hdr.vip = CAPTURE_NONE;
    cpu.rec.hdr.backend = CAPTURE_NONE;
    cpu.pending = 1;
}

/// The VIP and backend the full path chose for the packet (kept for the record; written
/// whether or not a capture runs: no branch, and [`arrive`] resets them).
#[inline(always)]
pub fn note(vip: u32, backend: u32) {
    if let Some(cpu) = this_cpu() {
        cpu.rec.hdr.vip = vip;
        cpu.rec.hdr.backend = backend;
    }
}

/// NAT, a client's packet: the backend the NAT table sends it to (the full path noted the
/// VIP; the slot's backend may not be the connection's). Only while a capture runs.
#[inline(always)]
pub fn nat_backend(backend: u32) {
    if running() {
        core::hint::cold_path();
        if let Some(cpu) = this_cpu() {
            cpu.rec.hdr.backend = backend;
        }
    }
}

/// NAT, a backend's answer: its backend, and its VIP found from the reverse entry (the
/// answer leaves from the VIP's address and port, `e.src`/`e.sport`), so the record names
/// the flow as `lb trace` does. The lookup runs only while a capture runs.
#[inline(always)]
pub fn nat_answer(pkt: &Parsed, e: &NatEntry) {
    if running() {
        core::hint::cold_path();
        let key = FlowKey {
            dst: e.src,
            dport: e.sport,
            ..pkt.key
        };
        let vip = find_vip_id(&key).unwrap_or(CAPTURE_NONE);
        note(vip, e.backend_id);
    }
}

/// The verdict is made and counted: hands it to `lb_capture` (which returns its action).
/// Returns when the tail call failed. `lb_nat`, which runs captured or not, asks
/// [`running`] first; `lb_full_capture` always records.
#[inline(always)]
pub fn leave(ctx: &XdpContext, verdict: Result<Verdict, Verdict>) {
    let (Ok(v) | Err(v)) = verdict;
    if let Some(cpu) = this_cpu() {
        cpu.action = v.action;
        cpu.stat = v.stat as u32;
        // SAFETY: tail call into our own program array; on success it does not return.
        unsafe { LB_CAPTURE_PROGS.tail_call(ctx, CAPTURE_RECORD) };
    }
}

/// Whether the frame left changed (so `--both` records it again): sent on, or encapsulated
/// and handed to the kernel to resolve the next hop.
#[inline(always)]
fn changed(action: u32, stat: u32) -> bool {
    action == xdp_action::XDP_TX
        || action == xdp_action::XDP_REDIRECT
        || stat == Stat::PassNoNeighbour as u32
}

/// The capture program: records the verdict [`leave`] handed over, if the capture's filters,
/// sampling and rate take it, and returns the verdict's action.
#[inline(always)]
pub fn record(ctx: &XdpContext) -> u32 {
    let Some(cpu) = this_cpu() else {
        return xdp_action::XDP_ABORTED;
    };
    let action = cpu.action;
    // Only a frame [`arrive`] copied (a capture turned on meanwhile finds none).
    if cpu.pending == 0 {
        return action;
    }
    cpu.pending = 0;
    let Some(cfg) = LB_CAPTURE.get(0) else {
        return action;
    };
    // SAFETY: helpers without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if cfg.on == 0 || now > cfg.until_ns {
        return action;
    }
    let Some(rate) = LB_CAPTURE_RATE.get_ptr_mut(0) else {
        return action;
    };
    let stat = cpu.stat;
    if !admit(cfg, rate, cpu, stat, action, now) {
        return action;
    }
    let h = &mut cpu.rec.hdr;
    h.ts_ns = now;
    h.stat = stat;
    h.action = action;
    h.direction = CAPTURE_ARRIVED;
    // SAFETY: as above.
    h.cpu = unsafe { bpf_get_smp_processor_id() };
    if !output(&LB_CAPTURE_RING, cpu) {
        return action;
    }
    if cfg.flags & CAPTURE_F_BOTH != 0 && changed(action, stat) {
        let (len, n) = copy_frame(ctx.ctx, cpu, cfg.snaplen);
        cpu.rec.hdr.orig_len = len;
        cpu.rec.hdr.cap_len = n;
        cpu.rec.hdr.direction = CAPTURE_LEFT;
        output(&LB_CAPTURE_RING, cpu);
    }
    action
}
