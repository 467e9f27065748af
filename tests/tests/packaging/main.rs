//! The packaging (`packaging/`) checked with its own tools and run: one binary, a module per
//! package (`cargo test --release -p lb-tests --test packaging systemd::`):
//!
//! - `container`: the Dockerfile, and a scratch image of `lb` run by podman;
//! - `kubernetes`: the manifests against the Kubernetes schema and the agent;
//! - `systemd`: the unit verified, and the agent run with exactly its capabilities.
mod container;
mod kubernetes;
mod systemd;
