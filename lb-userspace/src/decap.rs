//! `lb decap`: the backend side of encapsulated forwarding. Attaches the decapsulation
//! program to a backend's interface through a pinned link (it stays when the command exits,
//! like the agent's), fills its maps with this host's addresses, the VIPs it serves and the
//! senders it trusts, shows its counters, prints the backend's one-time setup, and detaches.
//!
//! Running it again converges: the program is replaced in place (no packet sees no program)
//! and the address maps are rewritten to exactly what was asked.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType, Xdp},
};
use ipnet::IpNet;
use lb_common::{
    Counter, DECAP_CONFIG_GLOBAL, DECAP_MAX_LOCAL, DECAP_MAX_TRUSTED, DECAP_STATS_MAP,
    DECAP_TRUSTED_MAP, DECAP_VIPS_MAP, DecapAddr, DecapConfig, DecapStat, TrustedKey,
};

use crate::{
    AttachMode, DECAP_OBJECT, DECAP_PROGRAM, DECAP_TC_PROGRAM, Error,
    dataplane::{attach_xdp_pinned, egress::attach_tc_pinned, require_capabilities},
    net::{addr_words, family},
};

/// Where the decap program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapHook {
    /// XDP (before the stack allocates an skb): the default.
    Xdp,
    /// tc ingress through tcx, with `BPF_F_ADJ_ROOM_FIXED_GSO` (keeps GRO'd packets whole).
    Tc,
}

impl DecapHook {
    fn link(self) -> &'static str {
        match self {
            DecapHook::Xdp => "link",
            DecapHook::Tc => "tc-link",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            DecapHook::Xdp => "xdp",
            DecapHook::Tc => "tc",
        }
    }
}

/// What `lb decap` attaches with.
#[derive(Clone, Debug)]
pub struct DecapOptions {
    pub iface: String,
    pub hook: DecapHook,
    /// XDP attach mode (with `DecapHook::Xdp`).
    pub mode: AttachMode,
    /// The VIPs whose packets are decapsulated.
    pub vips: BTreeSet<IpAddr>,
    /// This host's outer addresses (tunnels to other addresses pass untouched).
    pub local: BTreeSet<IpAddr>,
    /// Who may send this host tunnels, and the hops second chance may forward to.
    pub trusted: BTreeSet<IpNet>,
    /// Take tunnels from anyone (`--trust-any-source`, for a lab): `trusted` must be empty.
    pub trust_any: bool,
    pub gue_port: u16,
    pub bpffs: PathBuf,
}

/// `<bpffs>/xdp-lb-decap/<iface>`.
pub fn pin_dir(bpffs: &Path, iface: &str) -> PathBuf {
    bpffs.join("xdp-lb-decap").join(iface)
}

const PINNED_MAPS: [&str; 3] = [DECAP_VIPS_MAP, DECAP_STATS_MAP, DECAP_TRUSTED_MAP];

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
fn trusted_key(net: &IpNet) -> Key<TrustedKey> {
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

fn key(ip: IpAddr) -> DecapAddr {
    DecapAddr {
        addr: addr_words(ip),
        family: u32::from(family(ip)),
    }
}

/// Attaches (or updates) the decap program on `opts.iface`; returns what was done.
pub fn attach(opts: &DecapOptions) -> Result<String, Error> {
    if opts.vips.is_empty() {
        return Err(Error::Invalid(
            "give the VIPs to decapsulate for: --vip ADDR (repeatable) or --vip-file FILE".into(),
        ));
    }
    if opts.local.is_empty() {
        return Err(Error::Invalid(format!(
            "{} has no global address to receive tunnels on: give --local ADDR",
            opts.iface
        )));
    }
    if opts.trusted.is_empty() && !opts.trust_any {
        return Err(Error::Invalid(
            "give who may send this backend tunnels: --trusted-source PREFIX (repeatable: the \
             load balancers' addresses and --ipip-source-prefix ranges, and the peer backends \
             second chance forwards from), or --trust-any-source in a lab"
                .into(),
        ));
    }
    if opts.trust_any && !opts.trusted.is_empty() {
        return Err(Error::Invalid(
            "--trust-any-source trusts every sender: give it without --trusted-source".into(),
        ));
    }
    if opts.trusted.len() > DECAP_MAX_TRUSTED as usize {
        return Err(Error::Invalid(format!(
            "{} trusted sources given: at most {DECAP_MAX_TRUSTED} (name prefixes rather than \
             hosts)",
            opts.trusted.len()
        )));
    }
    if opts.gue_port == 0 {
        return Err(Error::Invalid("the GUE port must not be 0".into()));
    }
    if crate::dataplane::if_index(&opts.iface).is_none() {
        return Err(Error::NoSuchInterface(opts.iface.clone()));
    }
    require_capabilities()?;
    crate::dataplane::pins::ensure_bpffs(&opts.bpffs)?;
    let dir = pin_dir(&opts.bpffs, &opts.iface);
    let other = match opts.hook {
        DecapHook::Xdp => DecapHook::Tc,
        DecapHook::Tc => DecapHook::Xdp,
    };
    if dir.join(other.link()).exists() {
        return Err(Error::Conflict(format!(
            "decap runs at {} on {} already: `lb decap --iface {} --detach` first",
            other.as_str(),
            opts.iface,
            opts.iface
        )));
    }
    let maps = dir.join("maps");
    std::fs::create_dir_all(&maps).map_err(Error::io(format!("creating {}", maps.display())))?;
    let fresh = !dir.join(opts.hook.link()).exists();
    let result = load_and_attach(opts, &dir);
    if result.is_err() && fresh {
        remove(&dir);
    }
    result
}

/// Loads the decap object (verified, not attached) for GUE port `gue_port` and this host's
/// `local` addresses, with its maps pinned under `maps` (reused when pinned already).
pub fn load(gue_port: u16, local: &BTreeSet<IpAddr>, maps: Option<&Path>) -> Result<Ebpf, Error> {
    load_from(DECAP_OBJECT, gue_port, local, maps)
}

/// As [`load`], from `object`: [`DECAP_OBJECT`] or a build of the same programs with more
/// beside them (`DECAP_BENCH_OBJECT`, with the benchmark harness).
pub fn load_from(
    object: &[u8],
    gue_port: u16,
    local: &BTreeSet<IpAddr>,
    maps: Option<&Path>,
) -> Result<Ebpf, Error> {
    if local.len() > DECAP_MAX_LOCAL {
        return Err(Error::Invalid(format!(
            "{} local addresses given: at most {DECAP_MAX_LOCAL} (name them with --local)",
            local.len()
        )));
    }
    let mut cfg = DecapConfig {
        gue_port: gue_port.to_be(),
        n_local: local.len() as u16,
        ..DecapConfig::DEFAULT
    };
    for (slot, ip) in cfg.local.iter_mut().zip(local) {
        *slot = key(*ip);
    }
    if let Some(dir) = maps {
        drop_stale_stats(dir);
    }
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = match maps {
        Some(dir) => PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .override_global(DECAP_CONFIG_GLOBAL, &cfg, true)
        .load(object)
        .map_err(Error::Load)?;
    let xdp = program(&mut ebpf)?;
    crate::dataplane::load_retrying(|| xdp.load()).map_err(|source| Error::Program {
        name: DECAP_PROGRAM,
        source,
    })?;
    let tc = tc_program(&mut ebpf)?;
    crate::dataplane::load_retrying(|| tc.load()).map_err(|source| Error::Program {
        name: DECAP_TC_PROGRAM,
        source,
    })?;
    Ok(ebpf)
}

/// The tc variant of the decap program.
pub fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, Error> {
    let name = DECAP_TC_PROGRAM;
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// The decap XDP program of a loaded object.
pub fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, Error> {
    let name = DECAP_PROGRAM;
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// A pinned counter map of another size (pinned by a build with other counters) would be
/// adopted as it is, and the counters past its end silently lost: it is unpinned instead, so
/// the load makes one of the right size (the counters start from zero; the program that
/// still uses the old one is replaced by the attach that follows).
fn drop_stale_stats(dir: &Path) {
    let path = dir.join(DECAP_STATS_MAP);
    let Ok(map) = MapData::from_pin(&path) else {
        return;
    };
    let stale = map
        .info()
        .is_ok_and(|i| i.max_entries() != DecapStat::COUNT);
    if stale {
        let _ = std::fs::remove_file(&path);
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

fn load_and_attach(opts: &DecapOptions, dir: &Path) -> Result<String, Error> {
    let mut ebpf = load(opts.gue_port, &opts.local, Some(&dir.join("maps")))?;
    // VIPs and senders first: a fresh program must find them the moment it is attached.
    set_vips(&mut ebpf, &opts.vips)?;
    let trusted = if opts.trust_any {
        any_source()
    } else {
        opts.trusted.clone()
    };
    set_trusted(&mut ebpf, &trusted)?;
    let link = dir.join(opts.hook.link());
    let existed = link.exists();
    let how = match opts.hook {
        DecapHook::Xdp => attach_xdp_pinned(
            program(&mut ebpf)?,
            DECAP_PROGRAM,
            &opts.iface,
            opts.mode,
            &link,
        )?
        .map(|m| m.as_str()),
        DecapHook::Tc => {
            attach_tc_pinned(
                tc_program(&mut ebpf)?,
                DECAP_TC_PROGRAM,
                &opts.iface,
                TcAttachType::Ingress,
                &link,
            )?;
            (!existed).then_some("tc ingress (tcx)")
        }
    };
    let list = |s: &BTreeSet<IpAddr>| {
        s.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let what = match how {
        Some(mode) => format!("attached to {} in {mode} mode", opts.iface),
        None => format!(
            "updated on {} (the program was replaced in place)",
            opts.iface
        ),
    };
    let from = if opts.trust_any {
        "any sender (--trust-any-source)".to_string()
    } else {
        opts.trusted
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(format!(
        "decap {what}: tunnels (ipip, gue port {}) to {} for VIPs {} from {from} are \
         decapsulated; tunnels from other senders are dropped",
        opts.gue_port,
        list(&opts.local),
        list(&opts.vips)
    ))
}

fn remove(dir: &Path) {
    for hook in [DecapHook::Xdp, DecapHook::Tc] {
        let _ = std::fs::remove_file(dir.join(hook.link()));
    }
    for m in PINNED_MAPS {
        let _ = std::fs::remove_file(dir.join("maps").join(m));
    }
    let _ = std::fs::remove_dir(dir.join("maps"));
    let _ = std::fs::remove_dir(dir);
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

/// Detaches the decap program from `iface` (its pins go; the kernel drops it).
pub fn detach(iface: &str, bpffs: &Path) -> Result<String, Error> {
    let dir = pin_dir(bpffs, iface);
    if !dir.join(DecapHook::Xdp.link()).exists() && !dir.join(DecapHook::Tc.link()).exists() {
        return Err(Error::NotFound(format!(
            "no decap program is attached to {iface} (nothing pinned under {})",
            dir.display()
        )));
    }
    remove(&dir);
    if dir.exists() {
        return Err(Error::Kernel(format!(
            "could not remove every pin under {}",
            dir.display()
        )));
    }
    Ok(format!("decap detached from {iface}"))
}

/// The decap counters of `iface`, summed over CPUs, in [`DecapStat`] order.
pub fn stats(iface: &str, bpffs: &Path) -> Result<Vec<(&'static str, Counter)>, Error> {
    let path = pin_dir(bpffs, iface).join("maps").join(DECAP_STATS_MAP);
    if !path.exists() {
        return Err(Error::NotFound(format!(
            "no decap program is attached to {iface} (no counters at {})",
            path.display()
        )));
    }
    let name = DECAP_STATS_MAP;
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
    let m: PerCpuArray<_, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))
        .map_err(|source| Error::Map { name, source })?;
    let mut out = Vec::new();
    for s in DecapStat::ALL {
        let per_cpu = m
            .get(&(s as u32), 0)
            .map_err(|source| Error::Map { name, source })?;
        let mut c = Counter::default();
        for v in per_cpu.iter() {
            c.packets += v.packets;
            c.bytes += v.bytes;
        }
        out.push((s.name(), c));
    }
    Ok(out)
}

/// The backend's one-time setup for `vips` on `iface`, taking tunnels from `trusted`, as
/// shell commands. With no trusted source given, the command names what to put there.
pub fn setup_script(iface: &str, vips: &BTreeSet<IpAddr>, trusted: &BTreeSet<IpNet>) -> String {
    let mut s = String::from(
        "# One-time setup of a backend behind an encapsulating VIP (run as root).\n\
         # The VIP lives on lo, so the stack accepts the decapsulated packets and answers\n\
         # from the VIP straight to the client; the host must not answer ARP/ND for it.\n",
    );
    for vip in vips {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        s.push_str(&format!("ip addr add {vip}/{len} dev lo\n"));
    }
    s.push_str(&format!(
        "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.{iface}.arp_ignore=1\n\
         sysctl -w net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.{iface}.arp_announce=2\n\
         # The inner packet comes from the client but arrives on {iface}: loose or no\n\
         # reverse-path filtering (strict mode drops it when the client's route differs).\n\
         sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{iface}.rp_filter=2\n\
         # Then attach the decapsulation program (stays attached across restarts). It takes\n\
         # tunnels only from --trusted-source: every load balancer's encapsulation source\n\
         # (its --encap-source or interface address, and its --ipip-source-prefix), and the\n\
         # peer backends second chance forwards from.\n\
         lb decap --iface {iface}{}{}\n",
        vips.iter()
            .map(|v| format!(" --vip {v}"))
            .collect::<String>(),
        if trusted.is_empty() {
            " --trusted-source LB_PREFIX --trusted-source PEER_PREFIX".to_string()
        } else {
            trusted
                .iter()
                .map(|t| format!(" --trusted-source {t}"))
                .collect::<String>()
        }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_files_are_read_strictly() {
        let dir = std::env::temp_dir().join(format!("lb-decap-vips-{}", std::process::id()));
        std::fs::write(&dir, "# vips\n10.0.0.10\n\n2001:db8::10 # v6\n").unwrap();
        let v = read_vip_file(&dir).unwrap();
        assert_eq!(v.len(), 2);
        std::fs::write(&dir, "10.0.0.10\nnot-an-ip\n").unwrap();
        let e = read_vip_file(&dir).unwrap_err().to_string();
        assert!(e.contains(":2: `not-an-ip`"), "{e}");
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn setup_names_every_vip() {
        let vips: BTreeSet<IpAddr> = [
            "10.0.0.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ]
        .into_iter()
        .collect();
        let s = setup_script("eth0", &vips, &BTreeSet::new());
        assert!(s.contains("ip addr add 10.0.0.10/32 dev lo"));
        assert!(s.contains("ip addr add 2001:db8::10/128 dev lo"));
        assert!(s.contains(
            "lb decap --iface eth0 --vip 10.0.0.10 --vip 2001:db8::10 --trusted-source LB_PREFIX"
        ));
        let trusted = ["10.31.0.0/16", "fd00:31::/48"]
            .iter()
            .map(|p| parse_trusted(p).unwrap())
            .collect();
        let s = setup_script("eth0", &vips, &trusted);
        assert!(
            s.contains("--trusted-source 10.31.0.0/16 --trusted-source fd00:31::/48"),
            "{s}"
        );
    }

    #[test]
    fn trusted_sources_are_read_strictly() {
        assert_eq!(
            parse_trusted("10.31.0.0/16").unwrap().to_string(),
            "10.31.0.0/16"
        );
        assert_eq!(
            parse_trusted("10.31.0.2").unwrap().to_string(),
            "10.31.0.2/32"
        );
        assert_eq!(
            parse_trusted("fd00:31::2").unwrap().to_string(),
            "fd00:31::2/128"
        );
        assert_eq!(parse_trusted("::/0").unwrap().to_string(), "::/0");
        let e = parse_trusted("10.31.0.2/16").unwrap_err();
        assert!(e.contains("did you mean 10.31.0.0/16"), "{e}");
        for bad in ["10.31.0.0/33", "lb1", "10.31.0.0/", ""] {
            assert!(parse_trusted(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trie_keys_put_the_family_first() {
        let k = trusted_key(&parse_trusted("10.31.0.0/16").unwrap());
        assert_eq!(k.prefix_len(), 32 + 16);
        assert_eq!(k.data().family, 4);
        assert_eq!(k.data().addr[0].to_ne_bytes(), [10, 31, 0, 0]);
        let k = trusted_key(&parse_trusted("::/0").unwrap());
        assert_eq!((k.prefix_len(), k.data().family), (32, 6));
    }
}
