//! The agent and its command line, each test against its own agent in its own namespaces.
//! One binary, a module per feature (`cargo test --release -p lb-tests --test agent cli::`):
//!
//! - `operations`: CRUD, errors that change nothing, kill -9 and restore, health checks,
//!   apply plans, metrics;
//! - `cli`: `--version`, completions, man pages;
//! - `import`: `lb import nginx` through a real agent;
//! - `status_page`: the status page in headless Chromium;
//! - `skeleton`: the walking skeleton, `lb run` on a veth in native and generic mode;
//! - `scrape_storm`: 64 clients on `/metrics` and the status page slow neither changes nor
//!   health probes;
//! - `bind_first`: a taken metrics port refuses `lb run` before anything is attached;
//! - `vip_pools`: VIPs outside the `--vip-prefix` pools or on the node's own address refused.
mod bind_first;
mod cli;
mod import;
mod operations;
mod scrape_storm;
mod skeleton;
mod status_page;
mod vip_pools;
