//! Bounds-checked pointers into a frame (XDP, or the linear part of an skb in tc): the one
//! way the programs read packets.
use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    cty::c_void,
    helpers::bpf_xdp_load_bytes,
    programs::{TcContext, XdpContext},
};

/// A frame with direct packet access.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
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
