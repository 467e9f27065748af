//! The addresses the decap program works with: the trusted senders and the VIPs, read from
//! the command line and files (one clear line on a bad one) and written to its maps as
//! exactly what was asked. Apart from the load and attach, which only call it.
use std::{collections::BTreeSet, net::IpAddr, path::Path};

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};
use ipnet::IpNet;
use lb_common::{DECAP_TRUSTED_MAP, DECAP_VIPS_MAP, DecapAddr, TrustedKey};

use crate::{
    Error,
    net::{addr_words, family},
};

/// What `--trust-any-source` trusts: every address of both families.
pub fn any_source() -> BTreeSet<IpNet> {
    ["0.0.0.0/0", "::/0"]
        .iter()
        .map(|p| p.parse().expect("a valid prefix"))
        .collect()
}

/// Parses a `--trusted-source`: a prefix (`10.31.0.0/16`, `fd00:31::/48`) or one address (a
/// host prefix). A prefix with host bits set is refused rather than silently widened or cut:
/// the operator meant something else.
pub fn parse_trusted(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(format!(
                    "invalid trusted source `{s}`: expected an address or ADDRESS/LENGTH, e.g. \
                     10.31.0.0/16 or fd00:31::/48"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "invalid trusted source `{s}`: host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// The trie key of `net`: the family's bits, then the prefix's.
pub(super) fn trusted_key(net: &IpNet) -> Key<TrustedKey> {
    let ip = net.network();
    Key::new(
        TrustedKey::FAMILY_BITS + u32::from(net.prefix_len()),
        TrustedKey {
            family: u32::from(family(ip)),
            addr: addr_words(ip),
        },
    )
}

/// Reads a VIP list file: one address per line, `#` comments and blank lines ignored.
pub fn read_vip_file(path: &Path) -> Result<Vec<IpAddr>, Error> {
    let text =
        std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let ip: IpAddr = line.parse().map_err(|_| {
            Error::Invalid(format!(
                "{}:{}: `{line}` is not an IPv4 or IPv6 address",
                path.display(),
                n + 1
            ))
        })?;
        out.push(ip);
    }
    Ok(out)
}

pub(super) fn key(ip: IpAddr) -> DecapAddr {
    DecapAddr {
        addr: addr_words(ip),
        family: u32::from(family(ip)),
    }
}

/// Rewrites the trusted-sender trie to exactly `trusted`. New entries go in before stale ones
/// go, so a sender in both the old and the new set is never refused in between.
pub fn set_trusted(ebpf: &mut Ebpf, trusted: &BTreeSet<IpNet>) -> Result<(), Error> {
    let name = DECAP_TRUSTED_MAP;
    let m = ebpf.map_mut(name).ok_or(Error::MissingMap { name })?;
    let mut m: LpmTrie<_, TrustedKey, u32> =
        LpmTrie::try_from(m).map_err(|source| Error::Map { name, source })?;
    let want: Vec<Key<TrustedKey>> = trusted.iter().map(trusted_key).collect();
    let same = |a: &Key<TrustedKey>, b: &Key<TrustedKey>| {
        a.prefix_len() == b.prefix_len() && a.data() == b.data()
    };
    for k in &want {
        m.insert(k, 1, 0)
            .map_err(|source| Error::Map { name, source })?;
    }
    let have: Vec<Key<TrustedKey>> = m.keys().filter_map(Result::ok).collect();
    for k in have.iter().filter(|k| !want.iter().any(|w| same(k, w))) {
        m.remove(k).map_err(|source| Error::Map { name, source })?;
    }
    Ok(())
}

/// Rewrites the VIP map to exactly `vips`.
pub fn set_vips(ebpf: &mut Ebpf, vips: &BTreeSet<IpAddr>) -> Result<(), Error> {
    for (map, want) in [(DECAP_VIPS_MAP, vips)] {
        let m = ebpf.map_mut(map).ok_or(Error::MissingMap { name: map })?;
        let mut m: HashMap<_, DecapAddr, u32> =
            HashMap::try_from(m).map_err(|source| Error::Map { name: map, source })?;
        let want: BTreeSet<DecapAddr> = want.iter().map(|ip| key(*ip)).collect();
        let have: Vec<DecapAddr> = m.keys().filter_map(Result::ok).collect();
        for k in have.iter().filter(|k| !want.contains(k)) {
            m.remove(k)
                .map_err(|source| Error::Map { name: map, source })?;
        }
        for k in &want {
            m.insert(k, 1, 0)
                .map_err(|source| Error::Map { name: map, source })?;
        }
    }
    Ok(())
}
