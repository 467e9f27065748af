//! `lb decap`: the backend side of encapsulated forwarding. Attaches the decapsulation
//! program to a backend's interface through a pinned link (it stays when the command exits,
//! like the agent's), fills its maps with this host's addresses and the VIPs it serves, shows
//! its counters, prints the backend's one-time setup, and detaches.
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
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, Xdp},
};
use lb_common::{
    Counter, DECAP_CONFIG_GLOBAL, DECAP_MAX_LOCAL, DECAP_STATS_MAP, DECAP_VIPS_MAP, DecapAddr,
    DecapConfig, DecapStat,
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
    pub gue_port: u16,
    pub bpffs: PathBuf,
}

/// `<bpffs>/xdp-lb-decap/<iface>`.
pub fn pin_dir(bpffs: &Path, iface: &str) -> PathBuf {
    bpffs.join("xdp-lb-decap").join(iface)
}

const PINNED_MAPS: [&str; 2] = [DECAP_VIPS_MAP, DECAP_STATS_MAP];

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
    // VIPs first: a fresh program must find them the moment it is attached.
    set_vips(&mut ebpf, &opts.vips)?;
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
    Ok(format!(
        "decap {what}: tunnels (ipip, gue port {}) to {} for VIPs {} are decapsulated",
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

/// The backend's one-time setup for `vips` on `iface`, as shell commands.
pub fn setup_script(iface: &str, vips: &BTreeSet<IpAddr>) -> String {
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
         # Then attach the decapsulation program (stays attached across restarts):\n\
         lb decap --iface {iface}{}\n",
        vips.iter()
            .map(|v| format!(" --vip {v}"))
            .collect::<String>()
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
        let s = setup_script("eth0", &vips);
        assert!(s.contains("ip addr add 10.0.0.10/32 dev lo"));
        assert!(s.contains("ip addr add 2001:db8::10/128 dev lo"));
        assert!(s.contains("lb decap --iface eth0 --vip 10.0.0.10 --vip 2001:db8::10"));
    }
}
