//! The fleet's deny list: in store mode `lb deny add|remove` writes `deny/<PREFIX>` keys
//! (one per prefix, an end as an etcd lease as well as in the value) and every node applies
//! the list from there as its node-wide deny list, checked key by key as a VIP's value is.
use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    Error,
    agent::{Agent, Changed},
    fleet::{
        Fleet,
        schema::{Keys, Rejected},
    },
    model::{DesiredState, Prefix},
    protocol::Command,
};

/// One deny entry's value in etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyValue {
    /// When the entry ends, Unix seconds (absent or 0: never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub end_unix: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Largest deny value taken: `{"end_unix":18446744073709551615}` is 32 bytes, so anything
/// much larger was not written by `lb`, and no node parses or keeps it.
pub const MAX_DENY_VALUE: usize = 256;

/// One deny key and its value, checked: the key is a prefix in its one spelling (the form
/// `lb` writes, so two keys cannot name one prefix), the value `lb`'s JSON.
pub fn decode_deny(keys: &Keys, key: &str, value: &[u8]) -> Result<(Prefix, u64), String> {
    if value.len() > MAX_DENY_VALUE {
        return Err(format!(
            "value of {} bytes, above the {MAX_DENY_VALUE}-byte limit of a deny entry",
            value.len()
        ));
    }
    let prefix = key_prefix(keys, key)?;
    let v: DenyValue =
        serde_json::from_slice(value).map_err(|e| format!("not a deny entry's JSON value: {e}"))?;
    Ok((prefix, v.end_unix))
}

fn key_prefix(keys: &Keys, key: &str) -> Result<Prefix, String> {
    let name = key
        .strip_prefix(&keys.denies())
        .ok_or_else(|| format!("not under {}", keys.denies()))?;
    let prefix: Prefix = name.parse()?;
    if prefix.to_string() != name {
        return Err(format!("prefix `{name}` is not written as {prefix}"));
    }
    Ok(prefix)
}

/// The fleet's deny list from the keys `kvs` (all of one revision), without the entries
/// that ended before `now`. A key rejected for its value keeps the entry `last` applied
/// (or stays absent), as a VIP's does.
pub fn decode_denies(
    keys: &Keys,
    kvs: &[(String, Vec<u8>)],
    last: &BTreeMap<Prefix, u64>,
    now: u64,
) -> (BTreeMap<Prefix, u64>, Vec<Rejected>) {
    let mut out = BTreeMap::new();
    let mut rejected = Vec::new();
    for (key, value) in kvs {
        match decode_deny(keys, key, value) {
            Ok((p, end)) => {
                out.insert(p, end);
            }
            Err(why) => {
                if let Some((p, end)) = key_prefix(keys, key)
                    .ok()
                    .and_then(|p| last.get(&p).map(|e| (p, *e)))
                {
                    out.insert(p, end);
                }
                rejected.push(Rejected {
                    key: key.clone(),
                    why,
                });
            }
        }
    }
    out.retain(|_, end| *end == 0 || *end > now);
    (out, rejected)
}

/// One change to a deny key, from the watch: a put (with its value) or a delete.
#[derive(Clone, Debug)]
pub struct DenyEvent {
    pub key: String,
    /// `None`: the key was deleted.
    pub value: Option<Vec<u8>>,
    pub mod_revision: i64,
}

/// One deny key as the follower holds it.
#[derive(Clone, Debug)]
struct DenyKey {
    mod_revision: i64,
    /// The entry applied for it: its value's, or the last good one while the value is
    /// rejected (none if it never had one).
    entry: Option<(Prefix, u64)>,
    /// Why its value is rejected, and a hash of that value (to log a value once).
    rejected: Option<(String, u64)>,
}

/// The fleet's deny list as a node follows it: read whole once per watch session, then
/// edited key by key by the watch's events, so a bulk write of N prefixes costs each node
/// N decodes, not one decode of the whole list per transaction.
#[derive(Clone, Debug, Default)]
pub struct DenyKeys {
    keys: BTreeMap<String, DenyKey>,
}

impl DenyKeys {
    /// From a full read (`snap`); a key rejected for its value keeps the entry `last`
    /// applied (or stays absent), as a VIP's does.
    pub fn from_snapshot(
        keys: &Keys,
        snap: &crate::fleet::store::Snapshot,
        last: &BTreeMap<Prefix, u64>,
    ) -> Self {
        let mut out = DenyKeys::default();
        for ((key, value), rev) in snap.deny.iter().zip(&snap.deny_revisions) {
            let kept = key_prefix(keys, key)
                .ok()
                .and_then(|p| last.get(&p).map(|e| (p, *e)));
            out.put(keys, key, value, *rev, kept);
        }
        out
    }

    fn put(&mut self, keys: &Keys, key: &str, value: &[u8], rev: i64, kept: Option<(Prefix, u64)>) {
        let k = match decode_deny(keys, key, value) {
            Ok(entry) => DenyKey {
                mod_revision: rev,
                entry: Some(entry),
                rejected: None,
            },
            Err(why) => DenyKey {
                mod_revision: rev,
                entry: kept,
                rejected: Some((why, crate::fleet::value_hash(value))),
            },
        };
        self.keys.insert(key.to_string(), k);
    }

    /// The watch's events applied in order.
    pub fn edit(&mut self, keys: &Keys, events: &[DenyEvent]) {
        for e in events {
            match &e.value {
                Some(v) => {
                    let kept = self.keys.get(&e.key).and_then(|k| k.entry);
                    self.put(keys, &e.key, v, e.mod_revision, kept);
                }
                None => {
                    self.keys.remove(&e.key);
                }
            }
        }
    }

    /// The list to apply: every entry that has not ended before `now`. Two keys cannot
    /// name one prefix (a key is a prefix in its one spelling).
    pub fn list(&self, now: u64) -> BTreeMap<Prefix, u64> {
        self.keys
            .values()
            .filter_map(|k| k.entry)
            .filter(|(_, end)| *end == 0 || *end > now)
            .collect()
    }

    /// The keys whose values are rejected: the key, why, and a hash of the value.
    pub fn rejected(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.keys.iter().filter_map(|(key, k)| {
            k.rejected
                .as_ref()
                .map(|(why, hash)| (key.as_str(), why.as_str(), *hash))
        })
    }

    /// The newest `mod_revision` among the keys there now (0: none).
    pub fn newest(&self) -> i64 {
        self.keys
            .values()
            .map(|k| k.mod_revision)
            .max()
            .unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl Fleet {
    /// `lb deny add|remove` in store mode: written to etcd, applied by every node (this one
    /// too) from there.
    pub async fn execute_deny(
        &self,
        agent: &Arc<Agent>,
        cmd: &Command,
    ) -> Result<(Changed, Option<i64>), Error> {
        let store = self.store()?;
        let rev = match cmd {
            Command::DenyAdd { expires_s, .. } => {
                // The same checks as on a node of its own (a prefix given, an end of 1 s or
                // more), and the ends as it computes them.
                // On a blocking thread: a command may hold a list of megabytes.
                let (keys, c) = (self.keys.clone(), cmd.clone());
                let puts = blocking(move || {
                    let d =
                        crate::agent::ops::edit(&DesiredState::default(), &c)?.unwrap_or_default();
                    let mut puts = Vec::with_capacity(d.deny.len());
                    for (p, end) in &d.deny {
                        let value = serde_json::to_vec(&DenyValue { end_unix: *end })
                            .map_err(|e| Error::Invalid(format!("encoding {p}: {e}")))?;
                        puts.push((keys.deny(p), value));
                    }
                    Ok(puts)
                })
                .await?;
                // The lease outlives the end by a second: the program judges the end itself,
                // etcd's deletion only tidies up.
                let ttl = expires_s.map(|s| i64::try_from(s.saturating_add(1)).unwrap_or(i64::MAX));
                store.write_denies(&puts, &[], ttl).await?
            }
            Command::DenyRemove { prefixes } => {
                let snap = store.snapshot(None).await?;
                let (keys, c) = (self.keys.clone(), cmd.clone());
                blocking(move || {
                    let (current, _) = decode_denies(&keys, &snap.deny, &BTreeMap::new(), 0);
                    let d = DesiredState {
                        deny: current,
                        ..DesiredState::default()
                    };
                    crate::agent::ops::edit(&d, &c).map(drop)
                })
                .await?;
                let deletes: Vec<String> = prefixes.iter().map(|p| self.keys.deny(p)).collect();
                store.write_denies(&[], &deletes, None).await?
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "{} is not a deny list change",
                    cmd.describe()
                )));
            }
        };
        if !self
            .applied_at_least(rev, super::write::SEE_OWN_WRITE)
            .await
        {
            log::warn!("deny list revision {rev} written but not applied here in time");
        }
        agent.record(format!("{} (store revision {rev})", cmd.describe()));
        Ok((Changed::default(), Some(rev)))
    }
}

/// `f` on a blocking thread (CPU work over a whole list stays off the async workers).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Kernel(format!("a blocking task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (String, Vec<u8>) {
        (format!("/xdp-lb/c/deny/{k}"), v.as_bytes().to_vec())
    }

    #[test]
    fn entries_are_checked_key_by_key_and_a_bad_one_keeps_its_last_value() {
        let keys = Keys::new("c").unwrap();
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let last = BTreeMap::from([(p("198.51.100.0/24"), 0)]);
        let kvs = vec![
            kv("192.0.2.0/24", "{}"),
            kv("2001:db8::/64", r#"{"end_unix":500}"#),
            kv("203.0.113.0/24", r#"{"end_unix":50}"#),
            // Hostile or malformed: each rejected, the rest applied.
            kv("198.51.100.0/24", "{"),
            kv("192.0.2.7/24", "{}"),
            kv("2001:0db8:1::/64", "{}"),
            kv("10.1.0.0/16", r#"{"end_unix":1,"evil":true}"#),
            kv(
                "10.2.0.0/16",
                &format!("{{\"end_unix\":{}}}", " ".repeat(300)),
            ),
        ];
        let (deny, rejected) = decode_denies(&keys, &kvs, &last, 100);
        assert_eq!(
            deny,
            BTreeMap::from([
                (p("192.0.2.0/24"), 0),
                (p("2001:db8::/64"), 500),
                (p("198.51.100.0/24"), 0),
            ]),
            "the ended one left out, the broken one kept as it was"
        );
        let whys: Vec<&str> = rejected.iter().map(|r| r.why.as_str()).collect();
        assert_eq!(rejected.len(), 5, "{whys:?}");
        assert!(whys[0].contains("JSON"), "{whys:?}");
        assert!(whys[1].contains("host bits"), "{whys:?}");
        assert!(
            whys[2].contains("not written as 2001:db8:1::/64"),
            "{whys:?}"
        );
        assert!(whys[3].contains("unknown field"), "{whys:?}");
        assert!(whys[4].contains("256-byte limit"), "{whys:?}");
    }

    #[test]
    fn the_followed_list_is_edited_by_events_as_a_full_read_would_decode_it() {
        let keys = Keys::new("c").unwrap();
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let put = |k: &str, v: &str, rev| DenyEvent {
            key: format!("/xdp-lb/c/deny/{k}"),
            value: Some(v.as_bytes().to_vec()),
            mod_revision: rev,
        };
        let del = |k: &str, rev| DenyEvent {
            key: format!("/xdp-lb/c/deny/{k}"),
            value: None,
            mod_revision: rev,
        };
        let snap = crate::fleet::store::Snapshot {
            deny: vec![kv("192.0.2.0/24", "{}"), kv("198.51.100.0/24", "{")],
            deny_revisions: vec![5, 6],
            ..Default::default()
        };
        // The broken key keeps what the node last applied for its prefix.
        let last = BTreeMap::from([(p("198.51.100.0/24"), 0)]);
        let mut d = DenyKeys::from_snapshot(&keys, &snap, &last);
        assert_eq!(d.len(), 2);
        assert_eq!(d.newest(), 6);
        assert_eq!(d.rejected().count(), 1);
        d.edit(
            &keys,
            &[
                put("203.0.113.0/24", r#"{"end_unix":50}"#, 7),
                put("2001:db8::/64", r#"{"end_unix":500}"#, 7),
                // A good key turned bad keeps its last good entry; a bad one made good
                // is taken and no longer rejected.
                put("192.0.2.0/24", r#"{"evil":1}"#, 8),
                put("198.51.100.0/24", r#"{"end_unix":900}"#, 8),
                put("10.0.0.7/8", "{}", 9),
                // A new key with a bad value stays out of the list.
                put("10.1.0.0/16", r#"{"end_unix":1,"evil":true}"#, 9),
                del("2001:db8::/64", 10),
            ],
        );
        assert_eq!(
            d.list(100),
            BTreeMap::from([(p("192.0.2.0/24"), 0), (p("198.51.100.0/24"), 900)]),
            "the ended, the deleted and the unparsable left out"
        );
        let rejected: Vec<(&str, &str)> = d.rejected().map(|(k, w, _)| (k, w)).collect();
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert!(rejected[0].0.ends_with("10.0.0.7/8"), "{rejected:?}");
        assert!(rejected[1].0.ends_with("10.1.0.0/16"), "{rejected:?}");
        assert!(rejected[2].1.contains("unknown field"), "{rejected:?}");
        // The deleted key's revision no longer counts; the bad put's does.
        assert_eq!(d.newest(), 9);
        d.edit(
            &keys,
            &[
                del("10.0.0.7/8", 11),
                del("10.1.0.0/16", 11),
                del("192.0.2.0/24", 12),
            ],
        );
        assert_eq!(d.rejected().count(), 0);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn values_round_trip() {
        let keys = Keys::new("c").unwrap();
        let p: Prefix = "2001:db8::/48".parse().unwrap();
        for end in [0, 1_900_000_000] {
            let v = serde_json::to_vec(&DenyValue { end_unix: end }).unwrap();
            assert_eq!(decode_deny(&keys, &keys.deny(&p), &v), Ok((p, end)));
        }
        assert_eq!(serde_json::to_vec(&DenyValue::default()).unwrap(), b"{}");
    }
}
