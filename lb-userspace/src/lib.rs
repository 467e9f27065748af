//! Userspace half of the XDP load balancer. Packets flow API -> agent -> data plane; the
//! modules depend on each other in layers, each naming only those below it:
//!
//! ```text
//! run, decap, import, samples   the `lb` commands' work (`run` only wires a node together)
//! metrics                       Prometheus text and the status page, from the node
//! api                           the control API: server (answers from the node), client, listener
//! node                          composition root: the agent, its fleet, the background tasks
//! fleet                         store mode: follows etcd into the agent, publishes its status
//! announce                      VIP routes for the BGP speaker, gated by what the agent serves
//! dataplane                     the loaded program and its maps; implements agent::kernel's traits
//! agent                         desired state, ids, reconciler, health, neighbours, second chance
//! protocol                      the wire types: requests the agent takes, answers it gives
//! plan                          what a change does to the slot tables of the VIPs it touches
//! maglev, model                 slot tables; the desired state, its validation, who serves
//! net, error                    address helpers; typed errors
//! ```
//!
//! The agent reaches the kernel only through the small traits it owns (`agent::kernel`:
//! `Kernel`, `Counters`, `NatSweep`), which `dataplane` implements; so the data plane sits
//! above the agent in this listing although packets reach it last. The agent knows nothing
//! of the fleet: the node hands health flips to it.
//!
//! Pure logic (reconciliation, Maglev, plans, health thresholds, config parsing) is kept apart
//! from the code that touches the kernel so it is unit-tested without privileges; `anyhow` is
//! only used by the `lb` binary.

pub mod agent;
pub mod announce;
pub mod api;
pub mod capture;
pub mod clock;
pub mod dataplane;
pub mod decap;
pub mod error;
pub mod fleet;
pub mod import;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod nat_pool;
pub mod net;
pub mod node;
pub mod plan;
pub mod protocol;
pub mod run;
pub mod samples;

pub use dataplane::{AttachMode, Dataplane, LoadOptions};
pub use error::{Error, ErrorKind};

/// The compiled eBPF object, built by `build.rs` with aya-build and embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The backends' decapsulation object (`lb decap`).
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));
/// [`EBPF_OBJECT`] built with the benchmark harness programs (`lb-ebpf`'s `bench` feature:
/// `bench_*`, never attached), for `lb-bench`; the product object has none.
#[cfg(feature = "bench")]
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf-bench"));

/// [`DECAP_OBJECT`] built with its benchmark harness (`bench_decap`), for `lb-bench`.
#[cfg(feature = "bench")]
pub static DECAP_BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap-bench"));

/// Name of the decapsulation XDP program in [`DECAP_OBJECT`].
pub const DECAP_PROGRAM: &str = "lb_decap";
/// Name of its tc variant (`lb decap --attach tc`).
pub const DECAP_TC_PROGRAM: &str = "lb_decap_tc";

/// Name of the load-balancing XDP program in [`EBPF_OBJECT`].
pub const LB_PROGRAM: &str = "lb_xdp";
/// Name of the trivial XDP_PASS program for veth peers and benchmark floors.
pub const PASS_PROGRAM: &str = "xdp_pass";
