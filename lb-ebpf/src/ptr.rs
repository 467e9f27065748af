//! Bounds-checked pointers into a frame (XDP, or the linear part of an skb in tc): the one
//! way the programs read packets.
use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

/// A frame with direct packet access.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole frame's length: for XDP, the first buffer and every fragment of a
    /// multi-buffer (jumbo) frame; for tc, the skb's length. Direct access (`data..data_end`)
    /// sees only the first buffer (the skb's linear part), so "is the packet complete" is
    /// judged against this, and "can the program read this header" against `data_end`.
    fn frame_len(&self) -> usize;
    /// A copy of the `T` at `offset`, read by the kernel's helper (`bpf_xdp_load_bytes`,
    /// `bpf_skb_load_bytes`): for offsets computed at run time, where direct access lets LLVM
    /// address the bytes from the end of the bounds check, which the verifier refuses.
    #[allow(
        dead_code,
        reason = "the decap program's; the load balancer's build has no use"
    )]
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        // SAFETY: helper on our own context.
        unsafe { bpf_xdp_get_buff_len(self.ctx) as usize }
    }
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let mut out = MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes `size_of::<T>()` bytes into `out` or fails.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                offset as u32,
                out.as_mut_ptr() as *mut c_void,
                size_of::<T>() as u32,
            )
        };
        // SAFETY: initialised by the helper when it succeeded.
        (rc == 0).then(|| unsafe { out.assume_init() })
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        TcContext::load::<T>(self, offset).ok()
    }
}

/// Pointer to a `T` at `offset` bytes into the frame, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Mutable variant of [`ptr_at`].
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(|p| p as *mut T)
}

/// Whether the frame holds `end` bytes: in its first buffer (direct access, no helper call:
/// every single-buffer frame is judged here), or, for a multi-buffer frame, in all of it.
#[allow(
    dead_code,
    reason = "the load balancer's; the decap program judges no packet length"
)]
#[inline(always)]
pub fn holds(ctx: &impl Frame, end: usize) -> bool {
    ctx.data() + end <= ctx.data_end() || end <= ctx.frame_len()
}

/// Why a header the program wanted at `..end` is not readable: `split` when the frame does
/// hold it (a multi-buffer frame cut by its driver before the header's end: the packet is
/// whole, the program just cannot see that far), else `short` (the frame is truncated).
#[inline(always)]
pub fn unreadable<S>(ctx: &impl Frame, end: usize, split: S, short: S) -> S {
    if end <= ctx.frame_len() { split } else { short }
}
