//! What the two objects' packet captures share (`lb capture` in the load balancer, `lb decap
//! --capture` on the backends): the copy of a frame's first bytes into a record, the
//! capture's filters, sampling and rate limit, and the ring's output. Code only: each object
//! declares its own capture maps and hands them in.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::xdp_md,
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    maps::RingBuf,
};
use lb_common::{
    CAPTURE_MAX_SNAP, CaptureConfig, CaptureCpu, CaptureRate, CaptureRecord, RateStep, rate_step,
};

/// Copies the first `snaplen` bytes of the frame into `cpu`'s record; returns the frame's
/// whole length and how many bytes were copied.
#[inline(always)]
pub fn copy_frame(ctx: *mut xdp_md, cpu: &mut CaptureCpu, snaplen: u32) -> (u32, u32) {
    // SAFETY: helper on the program's own context.
    let len = unsafe { bpf_xdp_get_buff_len(ctx) } as u32;
    let mut n = if snaplen < len { snaplen } else { len };
    // Bounded for the verifier: the helper writes `n` bytes into the record's data.
    n &= 2 * CAPTURE_MAX_SNAP - 1;
    if n == 0 || n > CAPTURE_MAX_SNAP {
        return (len, 0);
    }
    // SAFETY: `n` bytes fit the record's data (checked above); the helper reads the frame,
    // across buffers, or fails.
    let rc = unsafe { bpf_xdp_load_bytes(ctx, 0, cpu.rec.data.as_mut_ptr() as *mut c_void, n) };
    (len, if rc == 0 { n } else { 0 })
}

/// Whether the capture takes a packet of this verdict (`stat`, `action`) whose record's VIP
/// and backend are set: the filters, then the sampling, then the rate limit every CPU shares,
/// `rate` (a packet sampled out and one over the rate are counted apart).
#[inline(always)]
pub fn admit(
    cfg: &CaptureConfig,
    rate: *mut CaptureRate,
    cpu: &mut CaptureCpu,
    stat: u32,
    action: u32,
    now: u64,
) -> bool {
    if !cfg.matches(stat, action, cpu.rec.hdr.vip, cpu.rec.hdr.backend) {
        return false;
    }
    // SAFETY: helper without arguments.
    if cfg.sample > 1 && unsafe { bpf_get_prandom_u32() } % cfg.sample != 0 {
        cpu.sampled_out += 1;
        return false;
    }
    if take(rate, now, cfg.window_ns, cfg.per_window) {
        true
    } else {
        cpu.missed += 1;
        false
    }
}

/// One record of the shared rate limit (`lb_common::rate_step`), without a lock: the count
/// grows by an atomic add (the one read-modify-write this BPF CPU version has; a
/// compare-and-swap needs v3). Two CPUs that both see the last free place, or both start
/// the same window, each let a record through: at most two more per other CPU and window,
/// as docs/capture.md states.
#[inline(always)]
fn take(rate: *mut CaptureRate, now: u64, window_ns: u64, per_window: u64) -> bool {
    // SAFETY: the map's one value, valid while the program runs; other CPUs write it too,
    // so every access is volatile (read fresh) and the count's increment atomic.
    unsafe {
        let seen = CaptureRate {
            window: core::ptr::read_volatile(&raw const (*rate).window),
            taken: core::ptr::read_volatile(&raw const (*rate).taken),
        };
        match rate_step(&seen, now, window_ns, per_window) {
            RateStep::Unlimited => true,
            RateStep::Start(w) => {
                core::ptr::write_volatile(&raw mut (*rate).window, w);
                core::ptr::write_volatile(&raw mut (*rate).taken, 1);
                true
            }
            RateStep::Take => {
                // The result unused: a plain atomic add (XADD). The intrinsic, as `core`'s
                // atomic types offer no read-modify-write on this target.
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*rate).taken, 1);
                true
            }
            RateStep::Full => false,
        }
    }
}

/// Outputs `cpu`'s record to `ring`; counts it as emitted, or as missed when the ring is
/// full (the reader is too slow).
#[inline(always)]
pub fn output(ring: &RingBuf, cpu: &mut CaptureCpu) -> bool {
    if ring.output::<CaptureRecord>(&cpu.rec, 0).is_ok() {
        cpu.emitted += 1;
        true
    } else {
        cpu.missed += 1;
        false
    }
}
