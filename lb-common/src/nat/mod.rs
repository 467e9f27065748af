//! Full NAT (`forward = "nat"`): the ABI of the translation tables and the pure rules both
//! the program and the agent apply (when an entry has expired, which port a flow tries, the
//! incremental checksum).
//!
//! Two hash maps hold every translated connection, one entry per direction, each keyed by the
//! packet's own 5-tuple as it arrives and holding the tuple to write instead:
//! - [`NAT_FWD_MAP`]: client -> VIP  becomes  LB address:NAT port -> backend:port;
//! - [`NAT_REV_MAP`]: backend:port -> LB address:NAT port  becomes  VIP -> client.
//!
//! A NAT port is taken by inserting the reverse entry with `BPF_NOEXIST`: its key is (backend
//! address and port, LB address, NAT port), so ports are allocated per (LB address, backend)
//! and a port in use is never handed out twice. Plain (not LRU) hashes: a full table refuses
//! new connections (counted) instead of evicting live ones. Entries expire by
//! [`nat_expired`]; the agent deletes expired pairs, and the program may take over an expired
//! port at once.
//!
//! By concern, one file each: `abi` (names, layout, defaults, state bits, the entry), `half`
//! (half-open slots), `state` (phases, expiry, the sequence window), `port` (port choice and
//! the pair's keys), `csum` (checksums). Everything is re-exported here (private modules, so
//! their names do not clash with the crate's own `abi`).
use crate::{FlowKey, PROTO_TCP};

mod abi;
mod csum;
mod half;
mod port;
mod state;

pub use abi::*;
pub use csum::*;
pub use half::*;
pub use port::*;
pub use state::*;

#[cfg(test)]
mod tests;
