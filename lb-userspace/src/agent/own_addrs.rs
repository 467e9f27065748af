//! The node's own addresses over rtnetlink, read just before a change is validated (outside
//! every lock), so a VIP is never put on an address the node uses for its own services.
//! Two dumps (addresses, routes); no subprocess.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    address::AddressAttribute,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::{Error, agent::Agent, model::OwnAddrs};

fn netlink(what: &'static str) -> impl Fn(rtnetlink::Error) -> Error {
    move |e| Error::Kernel(format!("reading this node's {what} over netlink: {e}"))
}

/// The preferred source of a unicast route (the local table's entries are of type `local`
/// and left out: a VIP held as a /32 is its own preferred source there).
fn route_source(msg: &RouteMessage) -> Option<IpAddr> {
    if msg.header.kind != RouteType::Unicast {
        return None;
    }
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::PrefSource(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

async fn dump(handle: &Handle) -> Result<OwnAddrs, Error> {
    let mut own = OwnAddrs::default();
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await.map_err(netlink("addresses"))? {
        // IFA_LOCAL is the address itself (IFA_ADDRESS is the peer on point-to-point links);
        // IPv6 carries only IFA_ADDRESS.
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let addr = local.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let Some(ip) = addr {
            own.interface.insert(ip, msg.header.prefix_len);
        }
    }
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(query).execute();
        while let Some(msg) = routes.try_next().await.map_err(netlink("routes"))? {
            own.route_sources.extend(route_source(&msg));
        }
    }
    Ok(own)
}

/// Reads the addresses of the network namespace this process runs in.
pub async fn read() -> Result<OwnAddrs, Error> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(Error::io("opening a netlink socket"))?;
    let task = tokio::spawn(conn);
    let own = dump(&handle).await;
    task.abort();
    own
}

impl Agent {
    /// Reads the node's own addresses and hands them to the core for the next validation.
    /// A failed read keeps the last addresses read (logged).
    pub async fn refresh_own_addrs(&self) {
        match read().await {
            Ok(own) => self.core().set_own_addrs(own),
            Err(e) => log::warn!("{e}: VIPs are checked against the addresses read before"),
        }
    }
}
