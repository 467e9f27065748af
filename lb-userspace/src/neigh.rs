//! Backend MACs from the kernel's neighbour table, read with iproute2's JSON output (`ip -j
//! neigh`): the same view `ip neigh` gives the operator. An unknown neighbour is solicited by
//! sending it one UDP datagram (discard port), then the table is read again.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::model::Mac;

#[derive(Deserialize)]
struct Entry {
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

fn lookup(iface: &str, addr: IpAddr) -> Option<Mac> {
    let out = Command::new("ip")
        .args(["-j", "neigh", "show", "to", &addr.to_string(), "dev", iface])
        .output()
        .ok()?;
    let entries: Vec<Entry> = serde_json::from_slice(&out.stdout).ok()?;
    entries
        .into_iter()
        .filter(|e| !e.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE"))
        .find_map(|e| e.lladdr?.parse().ok())
}

/// The MAC of `addr` on `iface`, soliciting it if needed (waits up to 2 s).
pub fn resolve(iface: &str, addr: IpAddr) -> Option<Mac> {
    if let Some(mac) = lookup(iface, addr) {
        return Some(mac);
    }
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let sock = UdpSocket::bind(bind).ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let _ = sock.send_to(b"", SocketAddr::new(addr, 9));
        std::thread::sleep(Duration::from_millis(100));
        if let Some(mac) = lookup(iface, addr) {
            return Some(mac);
        }
    }
    None
}
