//! `lb decap`: the backend side of encapsulated forwarding. Attaches the decapsulation
//! program to a backend's interface through a pinned link (it stays when the command exits,
//! like the agent's), fills its maps with this host's addresses, the VIPs it serves and the
//! senders it trusts, shows its counters, prints the backend's one-time setup, and detaches.
//!
//! Running it again converges: the program is replaced in place (no packet sees no program)
//! and the address maps are rewritten to exactly what was asked.
//!
//! `decap.rs` loads, attaches and detaches; `decap/addrs.rs` holds the trusted senders and
//! VIPs (parsed, and written to the maps), `decap/report.rs` the counters and setup script.
mod addrs;
mod report;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{SchedClassifier, TcAttachType, Xdp},
};
use ipnet::IpNet;
use lb_common::{
    DECAP_CONFIG_GLOBAL, DECAP_MAX_LOCAL, DECAP_MAX_TRUSTED, DECAP_STATS_MAP, DECAP_TRUSTED_MAP,
    DECAP_VIPS_MAP, DecapConfig, DecapStat,
};

use self::addrs::key;
pub use self::addrs::{any_source, parse_trusted, read_vip_file, set_trusted, set_vips};
pub use self::report::{setup_script, stats};
use crate::{
    AttachMode, DECAP_OBJECT, DECAP_PROGRAM, DECAP_TC_PROGRAM, Error,
    dataplane::{attach_xdp_pinned, egress::attach_tc_pinned, require_capabilities},
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
