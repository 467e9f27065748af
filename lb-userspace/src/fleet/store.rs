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
    /// The deny list's keys and values (`deny/<PREFIX>`); empty when read without it
    /// ([`Store::config_at`]).
    pub deny: Vec<(String, Vec<u8>)>,
    /// The `mod_revision` of each of `deny`, in its order.
    pub deny_revisions: Vec<i64>,
}

impl Snapshot {
    /// The configuration's revision: the last write to it. Node statuses move the store's
    /// revision every second; this one only moves when the configuration does, so nodes that
    /// applied the same configuration report the same number.
    pub fn config_revision(&self) -> i64 {
        let deny = self.deny_revisions.iter().copied().max().unwrap_or(0);
        self.meta.max(self.newest).max(deny)
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

/// The error of a deny list write that failed after `written` of `total` prefixes (the
/// transactions before the failed one stay written).
fn partial(written: usize, total: usize, adding: bool, cause: Error) -> Error {
    let (written, total) = (grouped(written), grouped(total));
    Error::Unavailable(if adding {
        format!(
            "wrote {written} of {total} prefixes before: {cause}; run the same command again to finish: adding is idempotent"
        )
    } else {
        // A removal checks that every prefix is listed, so the same command would refuse
        // the ones already removed.
        format!(
            "removed {written} of {total} prefixes before: {cause}; the others are still denied: remove the ones `lb deny list` still shows"
        )
    })
}

/// `n` with a comma between thousands (`4,200`), as an operator reads a count.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
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
        let mut snap = self.config_at(revision).await?;
        for kv in self
            .read_prefix(
                self.keys.denies(),
                snap.revision,
                DENY_PAGE,
                "reading the deny list",
            )
            .await?
        {
            snap.deny_revisions.push(kv.mod_revision());
            snap.deny.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            ));
        }
        Ok(snap)
    }

    /// The `mod_revision` of the `meta` key at `revision` (0: never written): a deny list
    /// batch without VIP changes moves only it and the deny keys.
    pub async fn meta_at(&self, revision: i64) -> Result<i64, Error> {
        let resp = self
            .kv
            .clone()
            .get(
                self.keys.meta(),
                Some(GetOptions::new().with_revision(revision)),
            )
            .await
            .map_err(self.error("reading the configuration"))?;
        Ok(resp.kvs().first().map_or(0, |kv| kv.mod_revision()))
    }

    /// As [`Store::snapshot`] without the deny list: what a follower that keeps the deny
    /// list from its watch events reads when a VIP key changed.
    pub async fn config_at(&self, revision: Option<i64>) -> Result<Snapshot, Error> {
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
        // Events only wake the follower (it reads the VIPs at their revision), so large
        // revisions may come in fragments.
        self.watch_prefix(self.keys.vips(), from, true).await
    }

    /// Watches the deny list's keys from `from` on (a second stream: the keys between the
    /// two prefixes include the node statuses, written every second). Not fragmented: the
    /// follower edits its list by these events, so each message holds whole revisions (one
    /// revision is bounded by etcd's request size, well under [`MAX_MESSAGE`]).
    pub async fn watch_denies(&self, from: i64) -> Result<WatchStream, Error> {
        self.watch_prefix(self.keys.denies(), from, false).await
    }

    async fn watch_prefix(
        &self,
        prefix: String,
        from: i64,
        fragment: bool,
    ) -> Result<WatchStream, Error> {
        let mut opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        if fragment {
            opts = opts.with_fragment();
        }
        self.watcher
            .clone()
            .watch(prefix, Some(opts))
            .await
            .map_err(self.error("watching the configuration"))
    }

    /// Writes the deny list's `puts` (under one lease of `ttl_s` seconds when given, so etcd
    /// deletes them when it ends) and `deletes`, in transactions of [`DENY_TXN`], each
    /// bumping `meta` so a concurrent configuration writer reads again. Not compared: adding
    /// or removing a prefix does not depend on the rest of the configuration. Returns the
    /// last revision written. The transactions before a failed one stay written: the error
    /// says how many prefixes were, and that the same command finishes the job (a put
    /// writes the same value again, and with `ttl_s` binds the entry to the new lease; a
    /// delete of a key already gone is a no-op in etcd).
    pub async fn write_denies(
        &self,
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
        ttl_s: Option<i64>,
    ) -> Result<i64, Error> {
        let total = puts.len() + deletes.len();
        let lease = match ttl_s {
            Some(ttl) => Some(
                self.grant(ttl)
                    .await
                    .map_err(|e| partial(0, total, true, e))?,
            ),
            None => None,
        };
        let opts = || lease.map(|l| PutOptions::new().with_lease(l));
        let ops: Vec<TxnOp> = puts
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), opts()))
            .chain(deletes.iter().map(|k| TxnOp::delete(k.as_str(), None)))
            .collect();
        let mut rev = 0;
        let mut written = 0;
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
                .map_err(|e| {
                    partial(
                        written,
                        total,
                        deletes.is_empty(),
                        self.error("writing the deny list")(e),
                    )
                })?;
            written += chunk.len();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_write_says_how_far_it_got() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(4_200), "4,200");
        assert_eq!(grouped(1_000_000), "1,000,000");
        let cause = || Error::Unavailable("etcd went away".into());
        assert_eq!(
            partial(4_200, 10_000, true, cause()).to_string(),
            "wrote 4,200 of 10,000 prefixes before: etcd went away; run the same command again to finish: adding is idempotent"
        );
        assert!(
            partial(100, 300, false, cause())
                .to_string()
                .starts_with("removed 100 of 300 prefixes before: etcd went away;")
        );
    }
}
