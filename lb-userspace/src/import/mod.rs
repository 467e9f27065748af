//! Importing other load balancers' configurations into ours. Pure: parsing and translation
//! take the text and a [`Resolver`]; the CLI reads files, resolves names and applies.
pub mod nginx;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, ToSocketAddrs as _};

/// Resolves host names (the CLI uses the system resolver; tests a table).
pub trait Resolver {
    fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String>;
}

/// The system's resolver (getaddrinfo: /etc/hosts, DNS).
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let mut out: Vec<IpAddr> = (host, 0)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .map(|a| a.ip())
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }
}
