//! Fleets: three load balancer nodes following a real etcd. One binary, a module per feature
//! (`cargo test --release -p lb-tests --test fleet health::`):
//!
//! - `config`: every node applies each revision and picks the same backend; concurrent
//!   writers; the fleet's deny list, in bulk too (`bulk_deny` holds its parts);
//! - `faults`: node loss, an etcd outage, an L2 fleet, a divergent node;
//! - `health`: the majority of the nodes' views decides;
//! - `secure`: etcd with TLS, client certificates, passwords and roles; oversized values.
//! - `hostile_store`: what an attacker writes to etcd is not taken on trust.
//! - `bgp`: VIPs announced by bird to a BGP router (BFD, drain, health gating, flaps).
//!
//! Fleets run one at a time whatever module they are in: `lb_tests::fleet::Fleet` holds a
//! process-wide turn for its whole life.
mod bgp;
mod bulk_deny;
mod config;
mod faults;
mod health;
mod hostile_store;
mod secure;
