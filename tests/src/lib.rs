//! Helpers for privileged end-to-end tests and the demo: throw-away network namespaces,
//! veth links and child processes, each removed by a guard on `Drop` (also when a test fails).
//!
//! Names are unique per process and call so tests can run in parallel. Everything is driven
//! through iproute2's `ip`, the same commands an operator would type.
pub mod agent;
pub mod chance;
pub mod etcd;
pub mod expect;
pub mod fleet;
pub mod frames;
pub mod insns;
pub mod jumbo;
pub mod l2fleet;
pub mod net;
pub mod proc;
pub mod raw;
pub mod routed;
pub mod topo;
pub mod traffic;
pub mod wait;
pub mod world;

pub use agent::AgentDir;
pub use net::{Netns, TwoHosts, VethPair, unique_name};
pub use proc::{ChildGuard, lb_binary};
pub use wait::wait_until;
