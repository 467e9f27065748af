//! Backend MACs from the kernel's neighbour table over rtnetlink, asynchronously and outside
//! every lock. One task dumps the table of the data-plane interface, then follows neighbour
//! events (`RTNLGRP_NEIGH`); it re-dumps every few seconds in case events were lost (the
//! socket can overflow). Addresses the agent wants but nobody has resolved yet are solicited
//! by sending one UDP datagram to their discard port, which makes the kernel ARP/ND for them.
//!
//! The last known MAC of an address is kept when its entry fails or is deleted: a host that
//! stops answering is the health checks' business; forgetting its MAC would only make it
//! `no-mac`. A changed MAC is reported as soon as the kernel learns it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    RouteNetlinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
};
use rtnetlink::{Handle, MulticastGroup, new_multicast_connection};
use tokio::sync::watch;

use crate::{Error, model::Mac};

/// What the agent asks of the neighbour table.
pub trait Neighbours: Send + Sync {
    /// The addresses whose MACs are needed now (replaces the previous set).
    fn want(&self, addrs: BTreeSet<IpAddr>);
}

/// The rtnetlink-backed [`Neighbours`]: a handle to the watcher task.
pub struct NetlinkNeighbours {
    wanted: watch::Sender<BTreeSet<IpAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NetlinkNeighbours {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Neighbours for NetlinkNeighbours {
    fn want(&self, addrs: BTreeSet<IpAddr>) {
        self.wanted.send_if_modified(|w| {
            let changed = *w != addrs;
            *w = addrs;
            changed
        });
    }
}

/// A usable (address, MAC) from a neighbour message on `ifindex`, if it carries one.
fn parse(msg: &NeighbourMessage, ifindex: u32) -> Option<(IpAddr, Mac)> {
    if msg.header.ifindex != ifindex {
        return None;
    }
    let usable = matches!(
        msg.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !usable {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some((*v4).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some((*v6).into()),
            NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                let m = [b[0], b[1], b[2], b[3], b[4], b[5]];
                // A zero or multicast lladdr is no backend's MAC.
                if m != [0; 6] && m[0] & 1 == 0 {
                    mac = Some(Mac(m));
                }
            }
            _ => {}
        }
    }
    Some((ip?, mac?))
}

async fn dump(handle: &Handle, ifindex: u32) -> Result<Vec<(IpAddr, Mac)>, rtnetlink::Error> {
    let mut out = Vec::new();
    let mut s = handle.neighbours().get().execute();
    while let Some(msg) = s.try_next().await? {
        out.extend(parse(&msg, ifindex));
    }
    Ok(out)
}

/// Sends one empty datagram to `addr`'s discard port so the kernel resolves its neighbour
/// (or, for an address behind a router, the route's next hop).
pub async fn solicit(addr: IpAddr) {
    let bind: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0u8; 4], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    if let Ok(sock) = tokio::net::UdpSocket::bind(bind).await {
        let _ = sock.send_to(b"", SocketAddr::new(addr, 9)).await;
    }
}

impl NetlinkNeighbours {
    /// Starts the watcher for interface `ifindex`; `report` gets every MAC learned or changed
    /// for a wanted address (it must not block: it runs on the watcher task).
    pub fn start(
        ifindex: u32,
        report: impl Fn(Vec<(IpAddr, Mac)>) + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        let (conn, handle, events) = new_multicast_connection(&[MulticastGroup::Neigh])
            .map_err(Error::io("opening a netlink socket for neighbour events"))?;
        let (wanted_tx, wanted) = watch::channel(BTreeSet::new());
        let task = tokio::spawn(async move {
            let conn_task = tokio::spawn(conn);
            let learned = Learned {
                known: BTreeMap::new(),
                report,
            };
            follow(ifindex, &handle, events, wanted, learned).await;
            conn_task.abort();
        });
        Ok(NetlinkNeighbours {
            wanted: wanted_tx,
            task,
        })
    }
}

/// The MACs known so far and where changes for wanted addresses are reported.
struct Learned<R> {
    known: BTreeMap<IpAddr, Mac>,
    report: R,
}

impl<R: Fn(Vec<(IpAddr, Mac)>)> Learned<R> {
    /// Reports what changed for wanted addresses; `fresh` are newly seen entries.
    fn publish(&mut self, fresh: Vec<(IpAddr, Mac)>, wanted: &BTreeSet<IpAddr>) {
        let mut out = Vec::new();
        for (ip, mac) in fresh {
            if self.known.insert(ip, mac) != Some(mac) && wanted.contains(&ip) {
                out.push((ip, mac));
            }
        }
        if !out.is_empty() {
            (self.report)(out);
        }
    }

    /// Newly wanted addresses already known are reported at once.
    fn report_known(&self, wanted: &BTreeSet<IpAddr>) {
        let have: Vec<(IpAddr, Mac)> = wanted
            .iter()
            .filter_map(|a| self.known.get(a).map(|m| (*a, *m)))
            .collect();
        if !have.is_empty() {
            (self.report)(have);
        }
    }

    /// Sends a solicitation to every wanted address not known yet.
    async fn solicit_missing(&self, wanted: &BTreeSet<IpAddr>) {
        for a in wanted.iter().filter(|a| !self.known.contains_key(a)) {
            solicit(*a).await;
        }
    }
}

/// The watcher's loop: neighbour events, periodic dumps, changes of the wanted set and
/// periodic solicitations, until the wanted set's sender is gone.
async fn follow<S>(
    ifindex: u32,
    handle: &Handle,
    mut events: impl futures_util::Stream<
        Item = (netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>, S),
    > + Unpin,
    mut wanted: watch::Receiver<BTreeSet<IpAddr>>,
    mut learned: Learned<impl Fn(Vec<(IpAddr, Mac)>)>,
) {
    let mut redump = tokio::time::interval(Duration::from_secs(5));
    let mut resolve = tokio::time::interval(Duration::from_secs(1));
    // Events can be lost (socket overflow) or end; periodic dumps carry on regardless.
    let mut events_open = true;
    loop {
        tokio::select! {
            ev = events.next(), if events_open => {
                let Some((msg, _)) = ev else {
                    log::warn!("neighbour events ended; following the table by periodic reads");
                    events_open = false;
                    continue;
                };
                if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) =
                    msg.payload
                {
                    let w = wanted.borrow().clone();
                    learned.publish(parse(&n, ifindex).into_iter().collect(), &w);
                }
            }
            _ = redump.tick() => {
                match dump(handle, ifindex).await {
                    Ok(all) => {
                        let w = wanted.borrow().clone();
                        learned.publish(all, &w);
                    }
                    Err(e) => log::warn!("reading the neighbour table: {e}"),
                }
            }
            changed = wanted.changed() => {
                if changed.is_err() { break }
                let w = wanted.borrow_and_update().clone();
                learned.report_known(&w);
                // Unknown ones: read the table now (an entry may exist whose event was
                // lost), then solicit what is still missing.
                if w.iter().any(|a| !learned.known.contains_key(a)) {
                    if let Ok(all) = dump(handle, ifindex).await {
                        learned.publish(all, &w);
                    }
                    learned.solicit_missing(&w).await;
                }
            }
            _ = resolve.tick() => {
                let w = wanted.borrow().clone();
                learned.solicit_missing(&w).await;
            }
        }
    }
}
