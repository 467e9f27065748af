//! etcd I/O for the fleet: consistent snapshots of the configuration, compare-on-revision
//! writes, the watch, and leased node statuses. Every call has a deadline, so a dead or
//! partitioned etcd turns into an error the caller handles (keep forwarding, retry), never a
//! hang.
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, TxnOp, TxnOpResponse,
    WatchOptions, WatchStream,
};

use crate::{
    Error,
    fleet::schema::{Keys, Write},
};

/// Deadline of one etcd request (and of connecting).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The configuration at one revision.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The store's revision the snapshot was read at.
    pub revision: i64,
    /// `mod_revision` of the `meta` key (0: never written); writers compare against it.
    pub meta: i64,
    /// The newest `mod_revision` among the VIP keys.
    pub newest: i64,
    /// The VIP keys and values.
    pub vips: Vec<(String, Vec<u8>)>,
}

impl Snapshot {
    /// The configuration's revision: the last write to it. Node statuses move the store's
    /// revision every second; this one only moves when the configuration does, so nodes that
    /// applied the same configuration report the same number.
    pub fn config_revision(&self) -> i64 {
        self.meta.max(self.newest)
    }
}

/// A connected etcd client for one cluster's keys.
#[derive(Clone)]
pub struct Store {
    client: Client,
    pub keys: Keys,
}

fn unavailable(what: &str) -> impl FnOnce(etcd_client::Error) -> Error + '_ {
    move |e| Error::Unavailable(format!("etcd: {what}: {}", short(&e)))
}

/// One short line for an etcd error: gRPC's message and the innermost cause (e.g. "tcp
/// connect error: Connection refused (os error 111)"), not tonic's whole debug chain.
pub(crate) fn short(e: &etcd_client::Error) -> String {
    let mut innermost: &dyn std::error::Error = e;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    let head = match e {
        etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => s.message().to_string(),
        _ => e.to_string(),
    };
    let cause = innermost.to_string();
    if std::ptr::addr_eq(innermost, e) || head.contains(&cause) {
        head
    } else {
        format!("{head}: {cause}")
    }
}

impl Store {
    /// Connects to the first reachable of `endpoints` (`host:port`).
    pub async fn connect(endpoints: &[String], keys: Keys) -> Result<Self, Error> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            // HTTP/2 pings find a dead peer on an idle watch. Not more often than every 5 s:
            // etcd's --grpc-keepalive-min-time (5 s) answers faster pings with GOAWAY.
            .with_keep_alive(Duration::from_secs(6), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(opts)))
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "etcd: no answer from {} within {REQUEST_TIMEOUT:?}",
                    endpoints.join(",")
                ))
            })?
            .map_err(unavailable("connecting"))?;
        Ok(Store { client, keys })
    }

    /// The VIP keys and the `meta` key, read in one transaction (one revision), or at
    /// `revision` when given.
    pub async fn snapshot(&self, revision: Option<i64>) -> Result<Snapshot, Error> {
        let mut vips = GetOptions::new().with_prefix();
        let mut meta = GetOptions::new();
        if let Some(r) = revision {
            vips = vips.with_revision(r);
            meta = meta.with_revision(r);
        }
        let txn = etcd_client::Txn::new().and_then([
            TxnOp::get(self.keys.vips(), Some(vips)),
            TxnOp::get(self.keys.meta(), Some(meta)),
        ]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(unavailable("reading the configuration"))?;
        let mut snap = Snapshot {
            revision: revision.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision())),
            ..Snapshot::default()
        };
        for (i, r) in resp.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(g) = r else { continue };
            for kv in g.kvs() {
                if i == 0 {
                    snap.newest = snap.newest.max(kv.mod_revision());
                    snap.vips.push((
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                    ));
                } else {
                    snap.meta = kv.mod_revision();
                }
            }
        }
        Ok(snap)
    }

    /// Writes `writes` if nobody wrote the configuration since `snap` was read: `meta` is
    /// unchanged (every `lb` write bumps it) and no VIP key was modified after the snapshot's
    /// revision (a write with another tool). Returns the new revision, or `None` when someone
    /// did write (the caller reads again).
    pub async fn commit(&self, snap: &Snapshot, writes: &[Write]) -> Result<Option<i64>, Error> {
        let mut ops: Vec<TxnOp> = writes
            .iter()
            .map(|w| match w {
                Write::Put { key, value } => TxnOp::put(key.as_str(), value.clone(), None),
                Write::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        ops.push(TxnOp::put(
            self.keys.meta(),
            b"written by lb".to_vec(),
            None,
        ));
        let txn = etcd_client::Txn::new()
            .when([
                Compare::mod_revision(self.keys.meta(), CompareOp::Equal, snap.meta),
                Compare::mod_revision(self.keys.vips(), CompareOp::Less, snap.revision + 1)
                    .with_prefix(),
            ])
            .and_then(ops);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(unavailable("writing the configuration"))?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// Watches the VIP keys from `from` on.
    pub async fn watch(&self, from: i64) -> Result<WatchStream, Error> {
        self.client
            .clone()
            .watch(
                self.keys.vips(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from)
                        .with_progress_notify(),
                ),
            )
            .await
            .map_err(unavailable("watching the configuration"))
    }

    /// Watches the node statuses (every write of any node).
    pub async fn watch_nodes(&self) -> Result<WatchStream, Error> {
        self.client
            .clone()
            .watch(self.keys.nodes(), Some(WatchOptions::new().with_prefix()))
            .await
            .map_err(unavailable("watching node statuses"))
    }

    /// A lease of `ttl` seconds for this node's status.
    pub async fn grant(&self, ttl: i64) -> Result<i64, Error> {
        Ok(self
            .client
            .clone()
            .lease_grant(ttl, None)
            .await
            .map_err(unavailable("granting a lease"))?
            .id())
    }

    /// Writes this node's status under `lease`; `false` when the lease has expired (the
    /// caller grants a new one).
    pub async fn put_status(&self, node: &str, lease: i64, value: Vec<u8>) -> Result<bool, Error> {
        let mut c = self.client.clone();
        match c
            .put(
                self.keys.node(node),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.to_string().contains("lease not found") => return Ok(false),
            Err(e) => return Err(unavailable("writing the node status")(e)),
        }
        // Renew once per write: the lease lives while this node keeps writing.
        let (mut keeper, mut stream) = c
            .lease_keep_alive(lease)
            .await
            .map_err(unavailable("renewing the lease"))?;
        keeper
            .keep_alive()
            .await
            .map_err(unavailable("renewing the lease"))?;
        let renewed = stream
            .message()
            .await
            .map_err(unavailable("renewing the lease"))?;
        Ok(renewed.is_some_and(|r| r.ttl() > 0))
    }

    /// Every node status currently alive (key suffix, value).
    pub async fn nodes(&self) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let resp = self
            .client
            .clone()
            .get(self.keys.nodes(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable("reading node statuses"))?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }

    /// Every node status key with the lease it is bound to (0: none), so the caller can tell
    /// a node's own leased status from a hand-written key.
    pub async fn node_statuses(&self) -> Result<Vec<crate::fleet::status::StatusKv>, Error> {
        let resp = self
            .client
            .clone()
            .get(self.keys.nodes(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable("reading node statuses"))?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| crate::fleet::status::StatusKv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                lease: kv.lease(),
            })
            .collect())
    }

    /// The TTL lease `id` was granted with, `None` when it is not alive.
    pub async fn lease_granted_ttl(&self, id: i64) -> Result<Option<i64>, Error> {
        let r = self
            .client
            .clone()
            .lease_time_to_live(id, None)
            .await
            .map_err(unavailable("reading a lease"))?;
        Ok((r.ttl() >= 0).then_some(r.granted_ttl()))
    }
}
