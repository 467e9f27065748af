//! What the two programs share: the load balancer (`lb-ebpf`, `src/main.rs`) and the
//! backends' decap program (`lb-decap`, `src/decap.rs`), each a binary of this crate built
//! into an object of its own. Only code lives here, every function `#[inline(always)]`: no
//! map and no program, which would land in both objects.
//!
//! - [`ptr`]: bounds-checked access to a frame's first buffer (XDP and tc), and completeness
//!   by the whole frame;
//! - [`proto`]: the Ethernet, IP and ICMP constants;
//! - [`fib`]: the kernel's FIB lookup and neighbour redirect, for encapsulated packets;
//! - [`owner`]: second chance's ownership test (does this host hold the flow) and hop list;
//! - [`capture_core`]: the packet capture's copy, filters, rate limit and output.
//!
//! The library is also `lb-userspace`'s build-dependency, so cargo rebuilds the objects when
//! this crate changes; built for the host there, it is empty.
#![no_std]
// The capture's shared rate limit adds to a count every CPU writes: `core`'s atomic types have
// no read-modify-write on the BPF target, the intrinsic compiles to the one it has (XADD).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// Public now that the functions are the library's: the raw pointers they take are a
// program's context (`XdpContext::ctx`, `TcContext::skb`), handed on to helpers, which the
// verifier checks; nothing here dereferences them.
#![allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "context pointers handed on to helpers, never dereferenced"
)]

#[cfg(target_arch = "bpf")]
pub mod capture_core;
#[cfg(target_arch = "bpf")]
pub mod fib;
#[cfg(target_arch = "bpf")]
pub mod owner;
#[cfg(target_arch = "bpf")]
pub mod proto;
#[cfg(target_arch = "bpf")]
pub mod ptr;
