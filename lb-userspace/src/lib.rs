//! Userspace half of the XDP load balancer: loads the embedded eBPF object, attaches it,
//! and wraps every BPF map in a typed struct with one method per operation.
//!
//! Pure logic (CLI parsing, formatting) is kept apart from the code that touches the kernel so
//! it can be unit-tested without privileges; `anyhow` is only used by the `lb` binary.

pub mod agent;
pub mod api;
pub mod batch;
pub mod client;
pub mod dataplane;
pub mod error;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod neigh;
pub mod net;
pub mod plan;
pub mod publish;
pub mod run;
pub mod samples;
pub mod stats;
pub mod tables;

pub use dataplane::{AttachMode, Dataplane, LoadOptions};
pub use error::Error;

/// The compiled eBPF object, built by `build.rs` with aya-build and embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Name of the load-balancing XDP program in [`EBPF_OBJECT`].
pub const LB_PROGRAM: &str = "lb_xdp";
/// Name of the trivial XDP_PASS program for veth peers and benchmark floors.
pub const PASS_PROGRAM: &str = "xdp_pass";
