//! `lb decap --capture`: the backend's frames as they arrived (the outer headers) and, with
//! `--both`, as the program left them (stripped, or rewritten for second chance's next hop),
//! with what it decided, into a ring buffer the capturing `lb decap` reads.
//!
//! The same shape as the load balancer's capture (`lb_common::capture`), smaller: off, the
//! program pays one load of [`DECAP_CAPTURE_ON`] and one branch. On, the copy and the record
//! are BPF-to-BPF functions (the decap object has no tail calls, so a call costs nothing in
//! stack), verified once rather than at each exit. The maps are unpinned: the capturing
//! `lb decap` finds them through the attached program (its link's program's maps).
use aya_ebpf::{
    bindings::xdp_md,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use lb_common::{
    CAPTURE_ARRIVED, CAPTURE_F_BOTH, CAPTURE_LEFT, CAPTURE_NONE, CAPTURE_RING_BYTES, CaptureConfig,
    CaptureCpu, CaptureRate,
};
use lb_ebpf::capture_core::{admit, copy_frame, output};

/// See `lb_common::DECAP_CAPTURE_CONFIG_MAP`.
#[map(name = "DECAP_CAP")]
static DECAP_CAP: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// See `lb_common::DECAP_CAPTURE_CPU_MAP`.
#[map(name = "DECAP_CAP_CPU")]
static DECAP_CAP_CPU: PerCpuArray<CaptureCpu> = PerCpuArray::with_max_entries(1, 0);

/// See `lb_common::DECAP_CAPTURE_RATE_MAP`.
#[map(name = "DECAP_CAP_RATE")]
static DECAP_CAP_RATE: Array<CaptureRate> = Array::with_max_entries(1, 0);

/// See `lb_common::DECAP_CAPTURE_RING_MAP`.
#[map(name = "DECAP_CAP_RING")]
static DECAP_CAP_RING: RingBuf = RingBuf::with_byte_size(CAPTURE_RING_BYTES, 0);

/// Set (non-zero) by the capturing `lb decap` (`lb_common::DECAP_CAPTURE_ON_GLOBAL`), alone
/// in the object's `.bss`: one load and one branch per packet when no capture runs.
#[unsafe(no_mangle)]
static mut DECAP_CAPTURE_ON: u32 = 0;

/// Whether a capture runs.
#[inline(always)]
pub fn running() -> bool {
    // SAFETY: a plain word the capturing process writes whole; read fresh on every packet.
    unsafe { core::ptr::read_volatile(&raw const DECAP_CAPTURE_ON) != 0 }
}

#[inline(always)]
fn this_cpu() -> Option<&'static mut CaptureCpu> {
    // SAFETY: this CPU's value; an XDP program is not preempted on its CPU, and the capturing
    // process only reads it (or zeroes it before a capture starts).
    DECAP_CAP_CPU.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Keeps the frame's first bytes as it arrived, before the program strips or rewrites it.
#[inline(never)]
pub fn arrive(ctx: *mut xdp_md) {
    let (Some(cfg), Some(cpu)) = (DECAP_CAP.get(0), this_cpu()) else {
        return;
    };
    let (len, n) = copy_frame(ctx, cpu, cfg.snaplen);
    cpu.rec.hdr.orig_len = len;
    cpu.rec.hdr.cap_len = n;
    cpu.rec.hdr.vip = CAPTURE_NONE;
    cpu.rec.hdr.backend = CAPTURE_NONE;
    cpu.pending = 1;
}

/// Records the verdict (`stat`, a `DecapStat`, and `action`) of the frame [`arrive`] copied,
/// if the filters, sampling and rate take it; with `--both`, also the frame as it leaves when
/// the program `changed` it.
#[inline(never)]
pub fn record(ctx: *mut xdp_md, stat: u32, action: u32, changed: bool) {
    let Some(cpu) = this_cpu() else { return };
    // Only a frame [`arrive`] copied (a capture turned on meanwhile finds none).
    if cpu.pending == 0 {
        return;
    }
    cpu.pending = 0;
    let (Some(cfg), Some(rate)) = (DECAP_CAP.get(0), DECAP_CAP_RATE.get_ptr_mut(0)) else {
        return;
    };
    // SAFETY: helpers without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if cfg.on == 0 || now > cfg.until_ns || !admit(cfg, rate, cpu, stat, action, now) {
        return;
    }
    let h = &mut cpu.rec.hdr;
    h.ts_ns = now;
    h.stat = stat;
    h.action = action;
    h.direction = CAPTURE_ARRIVED;
    // SAFETY: as above.
    h.cpu = unsafe { bpf_get_smp_processor_id() };
    if !output(&DECAP_CAP_RING, cpu) {
        return;
    }
    if cfg.flags & CAPTURE_F_BOTH != 0 && changed {
        let (len, n) = copy_frame(ctx, cpu, cfg.snaplen);
        cpu.rec.hdr.orig_len = len;
        cpu.rec.hdr.cap_len = n;
        cpu.rec.hdr.direction = CAPTURE_LEFT;
        output(&DECAP_CAP_RING, cpu);
    }
}
