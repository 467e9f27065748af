//! Where the fleet's desired state lives in etcd and how it is read and written. Pure: the
//! etcd I/O is in [`super::store`].
//!
//! Layout under `/xdp-lb/<cluster>/`:
//! - `vips/<VIP>` (e.g. `vips/10.0.0.10:80/tcp`): one JSON [`VipSpec`] with its backends. A
//!   VIP is the unit the rules are checked on (address families, weights, health check), so a
//!   malformed value rejects that VIP only and the others still apply; a VIP with thousands
//!   of backends stays far below etcd's 1.5 MiB value limit.
//! - `meta`: rewritten by every configuration write. Writers compare its `mod_revision` with
//!   the one they read (and that no VIP key changed after the revision they read, for writes
//!   made with other tools), so a change computed from an old state is refused instead of
//!   overwriting another operator's change (optimistic concurrency over the whole
//!   configuration: changes are rare, and a refused command is retried on the new state).
//! - `deny/<PREFIX>` (e.g. `deny/192.0.2.0/24`): one entry of the fleet's deny list (`lb deny`
//!   on any node in store mode), a JSON [`DenyValue`]; an entry with an end is written under
//!   an etcd lease of that length, so etcd itself deletes it when it ends. One key per prefix,
//!   so a malformed entry rejects that prefix only.
//! - `nodes/<node>`: each node's [`super::status::NodeStatus`], written under a lease so a
//!   dead node's entry disappears by itself.
use std::collections::BTreeMap;

use crate::model::{DesiredState, Prefix, VipAddr, VipSpec};

/// Longest cluster or node name: keeps keys readable and well inside etcd's limits.
pub const MAX_NAME: usize = 63;

/// Checks a cluster or node name: 1-63 of `[A-Za-z0-9._-]`.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "invalid {what} name `{name}`: use 1-{MAX_NAME} letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

/// The keys of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Result<Self, String> {
        check_name("cluster", cluster)?;
        Ok(Keys {
            root: format!("/xdp-lb/{cluster}/"),
        })
    }

    /// The cluster's prefix, `/xdp-lb/<cluster>/`.
    pub fn root(&self) -> String {
        self.root.clone()
    }

    pub fn vips(&self) -> String {
        format!("{}vips/", self.root)
    }

    pub fn vip(&self, vip: &VipAddr) -> String {
        format!("{}vips/{vip}", self.root)
    }

    pub fn meta(&self) -> String {
        format!("{}meta", self.root)
    }

    /// The fleet's deny list (`deny/<PREFIX>`).
    pub fn denies(&self) -> String {
        format!("{}deny/", self.root)
    }

    pub fn deny(&self, prefix: &Prefix) -> String {
        format!("{}deny/{prefix}", self.root)
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.root)
    }
}

/// A key whose value was not applied, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub key: String,
    pub why: String,
}

/// The desired state read from one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    pub state: DesiredState,
    pub rejected: Vec<Rejected>,
}

/// Largest VIP value taken. One VIP holding `--max-backends` (4096 by default) backends,
/// every one spelled at its longest (a full IPv6 address, a MAC, a weight, drained) stays
/// under it (a unit test checks), so no configuration the node can hold is refused; the
/// values of about 1.5 MiB etcd accepts by default are, so a key written with another tool
/// cannot make every node parse and keep megabytes per revision.
pub const MAX_VALUE: usize = 512 << 10;

/// One VIP's value, checked by every rule a single VIP is checked by, and by `check` (this
/// node's rules for the address: its pools, its own addresses).
pub fn decode_vip(
    keys: &Keys,
    key: &str,
    value: &[u8],
    check: &dyn Fn(&VipAddr) -> Result<(), String>,
) -> Result<(VipAddr, VipSpec), String> {
    if value.len() > MAX_VALUE {
        return Err(format!(
            "value of {} bytes, above the {} KiB limit of a VIP's value",
            value.len(),
            MAX_VALUE >> 10
        ));
    }
    let name = key
        .strip_prefix(&keys.vips())
        .ok_or_else(|| format!("not under {}", keys.vips()))?;
    let vip: VipAddr = name.parse()?;
    check(&vip)?;
    let spec: VipSpec =
        serde_json::from_slice(value).map_err(|e| format!("not a VIP's JSON value: {e}"))?;
    let one = DesiredState {
        vips: BTreeMap::from([(vip, spec)]),
        ..DesiredState::default()
    };
    one.validate()?;
    let (vip, spec) = one.vips.into_iter().next().ok_or("empty")?;
    Ok((vip, spec))
}

/// [`decode_checked`] with no address rule (the schema's own tests).
#[cfg(test)]
pub fn decode(keys: &Keys, kvs: &[(String, Vec<u8>)], last: &DesiredState) -> Decoded {
    decode_checked(keys, kvs, last, &|_| Ok(()))
}

/// The desired state of the VIP keys `kvs` (all of one revision), each VIP also checked by
/// `check` (this node's rules for its address). A key rejected for its value changes
/// nothing: its VIP keeps the value `last` applied (or stays absent), never a part of the
/// new value. A VIP whose address `check` refuses keeps no value at all: the address is the
/// key, so no value for it can pass.
pub fn decode_checked(
    keys: &Keys,
    kvs: &[(String, Vec<u8>)],
    last: &DesiredState,
    check: &dyn Fn(&VipAddr) -> Result<(), String>,
) -> Decoded {
    let mut out = Decoded::default();
    for (key, value) in kvs {
        match decode_vip(keys, key, value, check) {
            Ok((vip, spec)) => {
                out.state.vips.insert(vip, spec);
            }
            Err(why) => {
                // A last value this node's address rules now refuse (e.g. one applied before
                // the pools were set) is not kept either.
                let kept = key
                    .strip_prefix(&keys.vips())
                    .and_then(|n| n.parse::<VipAddr>().ok())
                    .filter(|v| check(v).is_ok())
                    .and_then(|v| last.vips.get(&v).map(|s| (v, s.clone())));
                if let Some((vip, spec)) = kept {
                    out.state.vips.insert(vip, spec);
                }
                out.rejected.push(Rejected {
                    key: key.clone(),
                    why,
                });
            }
        }
    }
    out
}

/// One write of a configuration change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// The writes that turn `old` into `new`: a put per VIP added or changed, a delete per VIP
/// removed; nothing for VIPs that did not change.
pub fn encode(keys: &Keys, old: &DesiredState, new: &DesiredState) -> Result<Vec<Write>, String> {
    let mut out = Vec::new();
    for (vip, spec) in &new.vips {
        if old.vips.get(vip) != Some(spec) {
            let value = serde_json::to_vec(spec).map_err(|e| format!("encoding {vip}: {e}"))?;
            // Refused here rather than written and then refused by every node.
            if value.len() > MAX_VALUE {
                return Err(format!(
                    "VIP {vip} would be {} bytes in etcd, above the {} KiB limit of a VIP's value: split its backends over more VIPs",
                    value.len(),
                    MAX_VALUE >> 10
                ));
            }
            out.push(Write::Put {
                key: keys.vip(vip),
                value,
            });
        }
    }
    for vip in old.vips.keys() {
        if !new.vips.contains_key(vip) {
            out.push(Write::Delete { key: keys.vip(vip) });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BackendSpec;

    fn vip(s: &str) -> VipAddr {
        s.parse().unwrap()
    }

    fn state(backends: &[&str]) -> DesiredState {
        let mut spec = VipSpec::default();
        for b in backends {
            spec.backends.insert(
                b.parse().unwrap(),
                BackendSpec {
                    weight: 100,
                    mac: None,
                    drained: false,
                },
            );
        }
        DesiredState {
            vips: BTreeMap::from([(vip("10.0.0.10:80/tcp"), spec)]),
            ..DesiredState::default()
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(Keys::new("prod-1").is_ok());
        for bad in ["", "a/b", "x y", &"n".repeat(64)] {
            assert!(Keys::new(bad).unwrap_err().contains("invalid cluster name"));
        }
    }

    #[test]
    fn writes_round_trip_through_decode() {
        let keys = Keys::new("c").unwrap();
        let new = state(&["10.0.0.2", "10.0.0.3"]);
        let writes = encode(&keys, &DesiredState::default(), &new).unwrap();
        let kvs: Vec<(String, Vec<u8>)> = writes
            .into_iter()
            .map(|w| match w {
                Write::Put { key, value } => (key, value),
                Write::Delete { .. } => panic!("no delete expected"),
            })
            .collect();
        assert_eq!(kvs[0].0, "/xdp-lb/c/vips/10.0.0.10:80/tcp");
        let d = decode(&keys, &kvs, &DesiredState::default());
        assert_eq!(d.state, new);
        assert!(d.rejected.is_empty());
        // Unchanged VIPs are not written; removed ones are deleted.
        assert!(encode(&keys, &new, &new).unwrap().is_empty());
        assert_eq!(
            encode(&keys, &new, &DesiredState::default()).unwrap(),
            vec![Write::Delete {
                key: "/xdp-lb/c/vips/10.0.0.10:80/tcp".into()
            }]
        );
    }

    #[test]
    fn the_largest_vip_a_node_holds_fits_under_the_value_limit() {
        let keys = Keys::new("c").unwrap();
        let mut spec = VipSpec::default();
        for i in 0..lb_common::DEFAULT_MAX_BACKENDS {
            let addr = format!("2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}");
            spec.backends.insert(
                addr.parse().unwrap(),
                BackendSpec {
                    weight: 65535,
                    mac: Some("aa:bb:cc:dd:ee:ff".parse().unwrap()),
                    drained: true,
                },
            );
        }
        let value = serde_json::to_vec(&spec).unwrap();
        assert!(value.len() < MAX_VALUE, "{}", value.len());
        let key = "/xdp-lb/c/vips/[2001:db8::10]:80/tcp";
        decode_vip(&keys, key, &value, &|_| Ok(())).unwrap();
        let mut big = value.clone();
        big.resize(MAX_VALUE + 1, b' ');
        let e = decode_vip(&keys, key, &big, &|_| Ok(())).unwrap_err();
        assert!(e.contains("above the 512 KiB limit"), "{e}");
    }

    #[test]
    fn a_change_whose_value_passes_the_limit_is_refused_before_it_is_written() {
        let keys = Keys::new("c").unwrap();
        let mut spec = VipSpec::default();
        for i in 0..8000u32 {
            let addr = format!(
                "2001:db8:ffff:ffff:ffff:ffff:{:x}:{:x}",
                i >> 16,
                i & 0xffff
            );
            spec.backends.insert(
                addr.parse().unwrap(),
                BackendSpec {
                    weight: 65535,
                    mac: Some("aa:bb:cc:dd:ee:ff".parse().unwrap()),
                    drained: true,
                },
            );
        }
        let mut new = DesiredState::default();
        new.vips.insert(vip("[2001:db8::10]:80/tcp"), spec);
        let e = encode(&keys, &DesiredState::default(), &new).unwrap_err();
        assert!(e.contains("above the 512 KiB limit"), "{e}");
    }

    #[test]
    fn a_refused_address_keeps_no_value_and_a_broken_value_keeps_its_last() {
        let keys = Keys::new("c").unwrap();
        let last = state(&["10.0.0.2"]);
        let value = serde_json::to_vec(&last.vips[&vip("10.0.0.10:80/tcp")]).unwrap();
        let kvs = vec![
            ("/xdp-lb/c/vips/10.0.0.10:80/tcp".to_string(), b"{".to_vec()),
            ("/xdp-lb/c/vips/10.9.9.9:*/tcp".to_string(), value),
        ];
        let refuse_all = |v: &VipAddr| Err(format!("VIP address {} is outside", v.ip));
        let d = decode_checked(&keys, &kvs, &last, &refuse_all);
        assert_eq!(d.rejected.len(), 2);
        assert!(d.rejected[1].why.contains("10.9.9.9 is outside"), "{d:?}");
        // A refused address keeps no value, not even the one applied before the rule.
        assert!(d.state.vips.is_empty(), "{d:?}");
        let refuse_other = |v: &VipAddr| match v.ip.to_string().as_str() {
            "10.9.9.9" => Err("VIP address 10.9.9.9 is outside".to_string()),
            _ => Ok(()),
        };
        let d = decode_checked(&keys, &kvs, &last, &refuse_other);
        // The VIP applied before keeps its value (not the broken `{`); the refused one stays
        // out.
        assert_eq!(d.rejected.len(), 2);
        assert_eq!(d.state, last);
    }

    #[test]
    fn a_malformed_key_keeps_its_last_value_and_the_rest_applies() {
        let keys = Keys::new("c").unwrap();
        let last = state(&["10.0.0.2"]);
        let good = serde_json::to_vec(&VipSpec::default()).unwrap();
        let kvs = vec![
            // Bad JSON for a VIP applied before: the old value stays.
            ("/xdp-lb/c/vips/10.0.0.10:80/tcp".to_string(), b"{".to_vec()),
            // A rule broken (weight out of range): rejected whole, not in part.
            (
                "/xdp-lb/c/vips/10.0.0.11:80/tcp".to_string(),
                br#"{"backends":{"10.0.0.2":{"weight":1},"10.0.0.3":{"weight":70000}}}"#.to_vec(),
            ),
            ("/xdp-lb/c/vips/not-a-vip".to_string(), good.clone()),
            ("/xdp-lb/c/vips/10.0.0.12:53/udp".to_string(), good),
        ];
        let d = decode(&keys, &kvs, &last);
        assert_eq!(d.rejected.len(), 3);
        assert!(d.rejected[0].why.contains("JSON"), "{:?}", d.rejected);
        assert!(d.rejected[1].why.contains("70000"), "{:?}", d.rejected);
        assert!(
            d.rejected[2].why.contains("invalid VIP"),
            "{:?}",
            d.rejected
        );
        assert_eq!(
            d.state
                .vips
                .keys()
                .map(|v| v.to_string())
                .collect::<Vec<_>>(),
            ["10.0.0.10:80/tcp", "10.0.0.12:53/udp"]
        );
        assert_eq!(
            d.state.vips[&vip("10.0.0.10:80/tcp")],
            last.vips[&vip("10.0.0.10:80/tcp")]
        );
    }
}
