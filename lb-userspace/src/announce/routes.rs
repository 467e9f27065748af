//! The announce table over rtnetlink: one blackhole route per announced address, in a
//! routing table the agent owns (`--announce-table`), marked with the agent's own route
//! protocol number so it never touches a route it did not add. The table is not used for
//! forwarding (no rule points at it); the speaker reads it (bird: `protocol kernel { kernel
//! table N; learn; }`) and the route's metric tells a plain announcement from a draining one.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt as _;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::{Error, announce::gate::Want};

/// The route protocol number of the agent's routes (`ip route ... proto 201`).
pub const PROTO: u8 = 201;
/// Metric of a plain announcement.
pub const METRIC_NORMAL: u32 = 100;
/// Metric of a draining announcement: the shipped bird template adds the GRACEFUL_SHUTDOWN
/// community to routes carrying it.
pub const METRIC_DRAINING: u32 = 200;

fn netlink(what: String) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |e| Error::Kernel(format!("{what} over netlink: {e}"))
}

fn metric(want: Want) -> u32 {
    match want {
        Want::Normal => METRIC_NORMAL,
        Want::Draining => METRIC_DRAINING,
    }
}

fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn host_route(msg: &RouteMessage) -> Option<(IpAddr, u32)> {
    let dst = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })?;
    let full = if dst.is_ipv4() { 32 } else { 128 };
    if msg.header.destination_prefix_length != full {
        return None;
    }
    let metric = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    Some((dst, metric))
}

/// The agent's routes in `table`: address -> metric.
pub async fn dump(handle: &Handle, table: u32) -> Result<BTreeMap<IpAddr, u32>, Error> {
    let mut out = BTreeMap::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .build(),
        RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(table)
            .build(),
    ] {
        let mut routes = handle.route().get(query).execute();
        while let Some(msg) = routes
            .try_next()
            .await
            .map_err(netlink(format!("reading table {table}")))?
        {
            if table_of(&msg) == table
                && msg.header.protocol == RouteProtocol::Other(PROTO)
                && let Some((addr, m)) = host_route(&msg)
            {
                out.insert(addr, m);
            }
        }
    }
    Ok(out)
}

fn message(table: u32, addr: IpAddr, metric: u32) -> RouteMessage {
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .table_id(table)
        .protocol(RouteProtocol::Other(PROTO))
        .kind(RouteType::BlackHole)
        .priority(metric);
    b = match b.destination_prefix(addr, prefix) {
        Ok(b) => b,
        Err(_) => unreachable!("a host prefix is valid for its own family"),
    };
    b.build()
}

/// Makes the agent's routes in `table` exactly `want`; returns how many routes it added or
/// deleted. A route whose mark changes is added with the new metric before the old one is
/// deleted, so the speaker never sees the address without a route.
pub async fn sync(
    handle: &Handle,
    table: u32,
    have: &BTreeMap<IpAddr, u32>,
    want: &BTreeMap<IpAddr, Want>,
) -> Result<usize, Error> {
    let mut changes = 0;
    for (addr, w) in want {
        let m = metric(*w);
        if have.get(addr) == Some(&m) {
            continue;
        }
        handle
            .route()
            .add(message(table, *addr, m))
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("announcing {addr} in table {table}")))?;
        changes += 1;
        if let Some(old) = have.get(addr) {
            delete(handle, table, *addr, *old).await?;
        }
    }
    for (addr, m) in have {
        if !want.contains_key(addr) {
            delete(handle, table, *addr, *m).await?;
            changes += 1;
        }
    }
    Ok(changes)
}

async fn delete(handle: &Handle, table: u32, addr: IpAddr, metric: u32) -> Result<(), Error> {
    match handle
        .route()
        .del(message(table, addr, metric))
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        // Gone already (someone else deleted it): what was wanted.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
        Err(e) => Err(netlink(format!("withdrawing {addr} from table {table}"))(e)),
    }
}
