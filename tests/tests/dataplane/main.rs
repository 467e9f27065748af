//! The data plane live: the real agent attached to veths in namespaces each test builds and
//! removes, with real clients and backends. One binary, a module per feature
//! (`cargo test --release -p lb-tests --test dataplane nat::`):
//!
//! - `e2e`: the scenarios on the demo network;
//! - `capture`, `capture_routed`, `capture_flood`: `lb capture` read back by tshark and
//!   tcpdump (L2 on the demo network; IPIP, GUE and NAT on the routed one; a flood);
//! - `encap`: IPIP and GUE to routed backends running `lb decap`;
//! - `nat`: full NAT on the routed network;
//! - `nat_close`: NAT ports held by who closed first; spoofed RSTs out of window;
//! - `second_chance`: connections through 100 backend changes with the flow table off;
//! - `hostile`: a stranger's tunnels to a backend (spoofed inner sources, a hop list naming
//!   a third host) refused, and a load balancer's hop to a stranger not relayed;
//! - `guard`: an allow list and `lb deny` under keep-alive traffic;
//! - `guard_flood`: a spoofed SYN flood against a new-flow limit, and without one;
//! - `flood`: the flow table under a spoofed flood, and a UDP client off a killed backend;
//! - `faults`: the agent under injected faults;
//! - `upgrade`: the previous release's pins migrated by this build under load;
//! - `jumbo`: veths at MTU 9000 with the agent attached natively and generically, raw frames
//!   of every size received byte for byte at a backend, a real TCP connection through full
//!   NAT with 8,000-byte segments, and the MTU changed under a running agent.
//!
//! Every name (namespaces, veths, directories) comes from `lb_tests::unique_name`, unique in
//! the process, so the tests of different modules run side by side as those of one did.
mod capture;
mod capture_flood;
mod capture_routed;
mod e2e;
mod encap;
mod faults;
mod flood;
mod guard;
mod guard_flood;
mod hostile;
mod jumbo;
mod nat;
mod nat_close;
mod nat_rate;
mod second_chance;
mod upgrade;
