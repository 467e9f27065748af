//! Jumbo frames: multi-buffer frames (a first buffer and page-sized fragments, as a driver
//! makes them at a 9000-byte MTU) through the real programs.
//!
//! - `fixtures`: BPF_PROG_TEST_RUN with the first buffer's length set in `xdp_md.data_end`
//!   (the kernel builds the rest as fragments): L2, IPIP, GUE, NAT and the backend's decap,
//!   each output compared byte for byte with a frame built independently; headers split by
//!   a buffer boundary passed under their own reason; a truncated multi-buffer frame still
//!   malformed; "too big" answers cut from a jumbo frame.
//! - `live`: veths at MTU 9000 with the agent attached natively and generically, raw frames
//!   of every size received byte for byte at a backend, a real TCP connection through full
//!   NAT with 8,000-byte segments, and the MTU changed under a running agent.
#[path = "jumbo/fixtures.rs"]
mod fixtures;
#[path = "jumbo/frames.rs"]
mod frames;
#[path = "jumbo/live.rs"]
mod live;
