//! etcd I/O for the fleet: consistent snapshots of the configuration, compare-on-revision
//! writes, the watch, and leased node statuses. Every call has a deadline, so a dead or
//! partitioned etcd turns into an error the caller handles (keep forwarding, retry), never a
//! hang.
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, PutOptions, TxnOp,
    WatchClient, WatchOptions, WatchStream,
};

use crate::{
    Error,
    fleet::{
        FleetConfig,
        access::{self, Access, StoreError},
        schema::{Keys, Write},
    },
};

/// Deadline of one etcd request (and of connecting).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest gRPC message this client decodes (tonic's default is 4 MiB, which one snapshot of
/// a few large values passed and froze every node). Reads are paged (below), so a message
/// holds at most [`PAGE`] values; etcd refuses a request, and so a value, above its
/// `--max-request-bytes` (1.5 MiB unless raised; etcd advises at most 10 MiB), so this bound
/// leaves room for several pages' worth of the largest values etcd accepts by default and
/// for any single value etcd's advice allows, while still capping what one answer makes
/// this node hold.
pub const MAX_MESSAGE: usize = 64 << 20;
/// Keys per range read to start with: a configuration of small VIP values is read in few
/// round trips. A page above [`MAX_MESSAGE`] is read again in halves, down to one key.
const PAGE: i64 = 64;
/// Keys per range read of the deny list to start with: its values are a few bytes, so a
/// list of thousands is read in few round trips (a page too large is halved as above).
const DENY_PAGE: i64 = 4096;
/// Writes per transaction of the deny list, under etcd's default `--max-txn-ops` (128) with
/// the `meta` bump beside them.
const DENY_TXN: usize = 100;

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
    /// The deny list's keys and values (`deny/<PREFIX>`).
    pub deny: Vec<(String, Vec<u8>)>,
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
    kv: KvClient,
    watcher: WatchClient,
    access: Access,
    /// The endpoints with their scheme, for messages.
    at: String,
    pub keys: Keys,
}

/// The key right after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("decoded message length too large"))
}

impl Store {
    /// Connects to the first reachable of the configured endpoints, with TLS and credentials
    /// when given. With a user, this authenticates (etcd's first answer); otherwise the first
    /// request is the first contact.
    pub async fn connect(config: &FleetConfig, keys: Keys) -> Result<Self, Error> {
        let access = config.access.clone();
        let at = format!("{}://{}", access.scheme(), config.endpoints.join(","));
        let opts = access.apply(
            ConnectOptions::new()
                .with_connect_timeout(REQUEST_TIMEOUT)
                .with_timeout(REQUEST_TIMEOUT)
                // HTTP/2 pings find a dead peer on an idle watch. Not more often than every
                // 5 s: etcd's --grpc-keepalive-min-time (5 s) answers faster pings with GOAWAY.
                .with_keep_alive(Duration::from_secs(6), Duration::from_secs(3))
                .with_keep_alive_while_idle(true),
        );
        let client = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Client::connect(&config.endpoints, Some(opts)),
        )
        .await
        .map_err(|_| {
            Error::Store(StoreError {
                at: at.clone(),
                what: "connecting",
                cause: access::Cause::Unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")),
            })
        })?
        .map_err(|e| {
            Error::Store(StoreError {
                at: at.clone(),
                what: "connecting",
                cause: access::classify(&e, &access, &keys.root()),
            })
        })?;
        Ok(Store {
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            watcher: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            client,
            access,
            at,
            keys,
        })
    }

    /// The typed error of a failed request doing `what`.
    pub fn error(&self, what: &'static str) -> impl FnOnce(etcd_client::Error) -> Error + '_ {
        move |e| {
            Error::Store(StoreError {
                at: self.at.clone(),
                what,
                cause: access::classify(&e, &self.access, &self.keys.root()),
            })
        }
    }

    /// The VIP keys and the `meta` key, all read at one revision (`revision`, or the store's
    /// current one). The VIP keys are read in pages so that no answer passes
    /// [`MAX_MESSAGE`] whatever the values under the prefix add up to.
    pub async fn snapshot(&self, revision: Option<i64>) -> Result<Snapshot, Error> {
        let fail = || self.error("reading the configuration");
        let mut kv = self.kv.clone();
        let mut meta = GetOptions::new();
        if let Some(r) = revision {
            meta = meta.with_revision(r);
        }
        let resp = kv.get(self.keys.meta(), Some(meta)).await.map_err(fail())?;
        let rev = revision.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision()));
        let mut snap = Snapshot {
            revision: rev,
            meta: resp.kvs().first().map_or(0, |kv| kv.mod_revision()),
            ..Snapshot::default()
        };
        for kv in self
            .read_prefix(self.keys.vips(), rev, PAGE, "reading the configuration")
            .await?
        {
            snap.newest = snap.newest.max(kv.mod_revision());
            snap.vips.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            ));
        }
        for kv in self
            .read_prefix(self.keys.denies(), rev, DENY_PAGE, "reading the deny list")
            .await?
        {
            snap.newest = snap.newest.max(kv.mod_revision());
            snap.deny.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            ));
        }
        Ok(snap)
    }

    /// Every key under `prefix` at revision `rev` (0: the current one), read in pages so that
    /// no answer passes [`MAX_MESSAGE`] whatever the values under the prefix add up to: a
    /// page is halved while it is too large.
    async fn read_prefix(
        &self,
        prefix: String,
        rev: i64,
        page: i64,
        what: &'static str,
    ) -> Result<Vec<etcd_client::KeyValue>, Error> {
        let mut kv = self.kv.clone();
        let end = prefix_end(&prefix);
        let mut from = prefix.into_bytes();
        let mut limit = page;
        let mut rev = rev;
        let mut out = Vec::new();
        loop {
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_revision(rev)
                .with_limit(limit);
            let mut page = match kv.get(from.clone(), Some(opts)).await {
                Ok(page) => page,
                Err(e) if too_large(&e) && limit > 1 => {
                    limit /= 2;
                    continue;
                }
                Err(e) => return Err(self.error(what)(e)),
            };
            // Every further page at the first page's revision: one consistent read.
            if rev == 0 {
                rev = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let kvs = page.take_kvs();
            match kvs.last() {
                Some(last) if more => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => {
                    out.extend(kvs);
                    break;
                }
            }
            out.extend(kvs);
        }
        Ok(out)
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
            .map_err(self.error("writing the configuration"))?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// Watches the VIP keys from `from` on.
    pub async fn watch(&self, from: i64) -> Result<WatchStream, Error> {
        self.watch_prefix(self.keys.vips(), from).await
    }

    /// Watches the deny list's keys from `from` on (a second stream: the keys between the
    /// two prefixes include the node statuses, written every second).
    pub async fn watch_denies(&self, from: i64) -> Result<WatchStream, Error> {
        self.watch_prefix(self.keys.denies(), from).await
    }

    async fn watch_prefix(&self, prefix: String, from: i64) -> Result<WatchStream, Error> {
        // Events only wake the follower (it reads a snapshot at their revision), so large
        // revisions may come in fragments.
        self.watcher
            .clone()
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from)
                        .with_progress_notify()
                        .with_fragment(),
                ),
            )
            .await
            .map_err(self.error("watching the configuration"))
    }

    /// Writes the deny list's `puts` (under one lease of `ttl_s` seconds when given, so etcd
    /// deletes them when it ends) and `deletes`, in transactions of [`DENY_TXN`], each
    /// bumping `meta` so a concurrent configuration writer reads again. Not compared: adding
    /// or removing a prefix does not depend on the rest of the configuration. Returns the
    /// last revision written.
    pub async fn write_denies(
        &self,
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
        ttl_s: Option<i64>,
    ) -> Result<i64, Error> {
        let lease = match ttl_s {
            Some(ttl) => Some(self.grant(ttl).await?),
            None => None,
        };
        let opts = || lease.map(|l| PutOptions::new().with_lease(l));
        let ops: Vec<TxnOp> = puts
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), opts()))
            .chain(deletes.iter().map(|k| TxnOp::delete(k.as_str(), None)))
            .collect();
        let mut rev = 0;
        for chunk in ops.chunks(DENY_TXN) {
            let mut ops = chunk.to_vec();
            ops.push(TxnOp::put(
                self.keys.meta(),
                b"written by lb".to_vec(),
                None,
            ));
            let resp = self
                .client
                .clone()
                .txn(etcd_client::Txn::new().and_then(ops))
                .await
                .map_err(self.error("writing the deny list"))?;
            rev = resp.header().map_or(rev, |h| h.revision());
        }
        Ok(rev)
    }

    /// Watches the node statuses (every write of any node).
    pub async fn watch_nodes(&self) -> Result<WatchStream, Error> {
        self.watcher
            .clone()
            .watch(
                self.keys.nodes(),
                Some(WatchOptions::new().with_prefix().with_fragment()),
            )
            .await
            .map_err(self.error("watching node statuses"))
    }

    /// A lease of `ttl` seconds for this node's status.
    pub async fn grant(&self, ttl: i64) -> Result<i64, Error> {
        Ok(self
            .client
            .clone()
            .lease_grant(ttl, None)
            .await
            .map_err(self.error("granting a lease"))?
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
            Err(e) => return Err(self.error("writing the node status")(e)),
        }
        // Renew once per write: the lease lives while this node keeps writing.
        let (mut keeper, mut stream) = c
            .lease_keep_alive(lease)
            .await
            .map_err(self.error("renewing the lease"))?;
        keeper
            .keep_alive()
            .await
            .map_err(self.error("renewing the lease"))?;
        let renewed = stream
            .message()
            .await
            .map_err(self.error("renewing the lease"))?;
        Ok(renewed.is_some_and(|r| r.ttl() > 0))
    }

    /// Every node status key with the lease it is bound to (0: none), so the caller can tell
    /// a node's own leased status from a hand-written key.
    pub async fn node_statuses(&self) -> Result<Vec<crate::fleet::status::StatusKv>, Error> {
        let kvs = self
            .read_prefix(self.keys.nodes(), 0, PAGE, "reading node statuses")
            .await?;
        Ok(kvs
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
            .map_err(self.error("reading a lease"))?;
        Ok((r.ttl() >= 0).then_some(r.granted_ttl()))
    }
}
