//! Loading the object: its maps created or adopted from pins and sized by the options, its
//! programs through the verifier and into the program arrays, its maps taken out as typed
//! tables. Its own module because it is the one place the object meets the kernel at start.
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray, xdp::DevMapHash},
    programs::{Xdp, XdpMode},
};
use lb_common::{
    BACKEND_STATS_MAP, BACKENDS_MAP, CONFIG_GLOBAL, Capacity, FLOW_STATS_MAP, FLOWS_MAP,
    FLOWS_NEW_MAP, FLOWS_PERCPU_MAP, SLOTS_MAP, STATS_MAP, TX_PORTS_MAP, VIP_FILTER_MAP,
    VIP_INFO_MAP, VIP_STATS_MAP, VIPS_MAP,
};
use std::path::{Path, PathBuf};

use super::{
    Dataplane, LoadOptions, guard, if_index, nat, require_capabilities,
    stats::StatsMaps,
    tables::{BackendTable, FlowTable, SlotTable, VipTable},
};
use crate::{EBPF_OBJECT, Error, LB_PROGRAM, PASS_PROGRAM};

/// The object with its maps created (or reused from `pin_dir`) and sized by `opts`, and its
/// load-time configuration set; the programs are not loaded yet.
/// With `staged`, the maps it names are created under its directory instead (a migration's
/// new maps, beside the old set it must not touch yet).
fn open_object(
    object: &[u8],
    opts: &LoadOptions,
    pin_dir: Option<&Path>,
    staged: Option<(&Path, &[&str])>,
) -> Result<Ebpf, Error> {
    let cfg = opts.config();
    let mut loader = EbpfLoader::new();
    let pin_of = |dir: &Path, m: &str| match staged {
        Some((to, names)) if names.contains(&m) => to.join(m),
        _ => dir.join(m),
    };
    let pins: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => pinned_maps().map(|m| (m, pin_of(dir, m))).collect(),
        None => Vec::new(),
    };
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    // Every capacity the options decide, from the one description of each map.
    for m in lb_common::LB_MAPS {
        if !matches!(m.capacity, Capacity::Fixed(_)) {
            loader.map_max_entries(m.name, opts.capacity(m.capacity)?);
        }
    }
    loader
        .override_global(CONFIG_GLOBAL, &cfg, true)
        .load(object)
        .map_err(Error::Load)
}

/// Loads every program of the object (the verifier runs here) and enters the tail-called ones
/// (NAT, the full path) in the program array.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), Error> {
    for name in [
        LB_PROGRAM,
        PASS_PROGRAM,
        lb_common::NAT_PROGRAM,
        lb_common::FULL_PROGRAM,
        lb_common::CAPTURE_PROGRAM,
        lb_common::CAPTURE_FULL_PROGRAM,
        lb_common::GUARD_PROGRAM,
    ] {
        let prog = xdp_program(ebpf, name)?;
        load_retrying(|| prog.load()).map_err(|source| Error::Program { name, source })?;
    }
    // The NAT program and the full path are entered by tail calls through the (pinned)
    // program array: a pin keeps the entries while no agent runs.
    for (map, index, name) in [
        (
            lb_common::PROGS_MAP,
            lb_common::PROG_NAT,
            lb_common::NAT_PROGRAM,
        ),
        (
            lb_common::PROGS_MAP,
            lb_common::PROG_FULL,
            lb_common::FULL_PROGRAM,
        ),
        (
            lb_common::PROGS_MAP,
            lb_common::PROG_GUARD,
            lb_common::GUARD_PROGRAM,
        ),
        // Unpinned: it empties when this process ends, and a capture ends with it.
        (
            lb_common::CAPTURE_PROGS_MAP,
            lb_common::CAPTURE_RECORD,
            lb_common::CAPTURE_PROGRAM,
        ),
        (
            lb_common::CAPTURE_PROGS_MAP,
            lb_common::CAPTURE_FULL,
            lb_common::CAPTURE_FULL_PROGRAM,
        ),
    ] {
        let fd = xdp_program(ebpf, name)?
            .fd()
            .map_err(|source| Error::Program { name, source })?
            .try_clone()
            .map_err(Error::io(format!("duplicating program {name}'s fd")))?;
        let mut progs = aya::maps::ProgramArray::try_from(
            ebpf.map_mut(map).ok_or(Error::MissingMap { name: map })?,
        )
        .map_err(map_err(map))?;
        progs.set(index, &fd, 0).map_err(map_err(map))?;
    }
    let name = lb_common::HC_PROGRAM;
    let hc: &mut aya::programs::SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(|source| Error::Program { name, source })?;
    load_retrying(|| hc.load()).map_err(|source| Error::Program { name, source })
}

/// The VIP tables, taken out of the object, with the NAT addresses the pre-filter keeps.
fn take_vips(ebpf: &mut Ebpf, nat_filtered: Vec<[u32; 4]>) -> Result<VipTable, Error> {
    VipTable::new(
        HashMap::try_from(take(ebpf, VIPS_MAP)?).map_err(map_err(VIPS_MAP))?,
        Array::try_from(take(ebpf, VIP_INFO_MAP)?).map_err(map_err(VIP_INFO_MAP))?,
        Array::try_from(take(ebpf, VIP_FILTER_MAP)?).map_err(map_err(VIP_FILTER_MAP))?,
        Array::try_from(take(ebpf, lb_common::VIP_INDEX_MAP)?)
            .map_err(map_err(lb_common::VIP_INDEX_MAP))?,
        nat_filtered,
    )
}

/// The flow table in use (shared or per-CPU lists), its probation table and its cache.
fn take_flows(ebpf: &mut Ebpf, opts: &LoadOptions) -> Result<FlowTable, Error> {
    let flows_map = if opts.per_cpu_flows {
        FLOWS_PERCPU_MAP
    } else {
        FLOWS_MAP
    };
    Ok(FlowTable::new(
        HashMap::try_from(take(ebpf, flows_map)?).map_err(map_err(flows_map))?,
        opts.hash_seed,
        Array::try_from(take(ebpf, FLOWS_NEW_MAP)?).map_err(map_err(FLOWS_NEW_MAP))?,
        Array::try_from(take(ebpf, lb_common::FLOW_CACHE_MAP)?)
            .map_err(map_err(lb_common::FLOW_CACHE_MAP))?,
        opts.cache_slots(),
    ))
}

/// The per-CPU counter maps, taken out of the object.
fn take_stats(ebpf: &mut Ebpf) -> Result<StatsMaps, Error> {
    Ok(StatsMaps {
        global: PerCpuArray::try_from(take(ebpf, STATS_MAP)?).map_err(map_err(STATS_MAP))?,
        flows: PerCpuArray::try_from(take(ebpf, FLOW_STATS_MAP)?)
            .map_err(map_err(FLOW_STATS_MAP))?,
        hc: PerCpuArray::try_from(take(ebpf, lb_common::HC_STATS_MAP)?)
            .map_err(map_err(lb_common::HC_STATS_MAP))?,
        vips: PerCpuArray::try_from(take(ebpf, VIP_STATS_MAP)?).map_err(map_err(VIP_STATS_MAP))?,
        vip_guard: PerCpuArray::try_from(take(ebpf, lb_common::VIP_GUARD_STATS_MAP)?)
            .map_err(map_err(lb_common::VIP_GUARD_STATS_MAP))?,
        backends: PerCpuArray::try_from(take(ebpf, BACKEND_STATS_MAP)?)
            .map_err(map_err(BACKEND_STATS_MAP))?,
        top: aya::maps::HashMap::try_from(take(ebpf, lb_common::TOP_SOURCES_MAP)?)
            .map_err(map_err(lb_common::TOP_SOURCES_MAP))?,
    })
}

impl Dataplane {
    /// Loads the embedded object into the kernel (the verifier runs here), sized by `opts`.
    pub fn load(opts: LoadOptions) -> Result<Self, Error> {
        Self::load_with_pins(opts, None)
    }

    /// As [`Dataplane::load`], with every map pinned under `pin_dir` (bpffs). Maps already
    /// pinned there are reused as they are, flows and counters included: check them first
    /// with [`pins::check`](super::pins::check).
    pub fn load_with_pins(opts: LoadOptions, pin_dir: Option<&Path>) -> Result<Self, Error> {
        Self::load_object(EBPF_OBJECT, opts, pin_dir, None)
    }

    /// As [`Dataplane::load_with_pins`] for a migration: the maps named in `created` are made
    /// new and pinned under `staged_dir`; the others are adopted from `pin_dir`.
    pub fn load_staged(
        opts: LoadOptions,
        pin_dir: &Path,
        staged_dir: &Path,
        created: &[&str],
    ) -> Result<Self, Error> {
        Self::load_object(
            EBPF_OBJECT,
            opts,
            Some(pin_dir),
            Some((staged_dir, created)),
        )
    }

    /// As [`Dataplane::load`], from `object`: [`EBPF_OBJECT`] or a build of the same
    /// programs with more beside them (`BENCH_OBJECT`, the benchmark harnesses).
    pub fn load_from(object: &[u8], opts: LoadOptions) -> Result<Self, Error> {
        Self::load_object(object, opts, None, None)
    }

    fn load_object(
        object: &[u8],
        opts: LoadOptions,
        pin_dir: Option<&Path>,
        staged: Option<(&Path, &[&str])>,
    ) -> Result<Self, Error> {
        require_capabilities()?;
        opts.validate()?;
        let mut ebpf = open_object(object, &opts, pin_dir, staged)?;
        load_programs(&mut ebpf)?;
        let (nat, nat_sweeper) = nat::from_maps(
            take(&mut ebpf, lb_common::NAT_FWD_MAP)?,
            take(&mut ebpf, lb_common::NAT_REV_MAP)?,
            take(&mut ebpf, lb_common::NAT_ADDRS_MAP)?,
            take(&mut ebpf, lb_common::NAT_REFUSED_MAP)?,
            &opts,
        )?;
        // A pinned set may have NAT source addresses on: the program running on these maps
        // answers on them, so the pre-filter rebuilt here keeps them (until the agent decides).
        // A migration that makes `LB_NAT_ADDRS` new finds it empty here (the first copy comes
        // after the load), while the old program still answers on the old map's addresses
        // through the pre-filter it shares: those are kept instead.
        let mut nat_filtered = nat.pinned_addrs();
        if let (Some(dir), Some((_, created))) = (pin_dir, staged)
            && created.contains(&lb_common::NAT_ADDRS_MAP)
        {
            nat_filtered = nat::addrs_pinned_at(&dir.join(lb_common::NAT_ADDRS_MAP));
        }
        let vips = take_vips(&mut ebpf, nat_filtered)?;
        let slots = SlotTable::new(
            Array::try_from(take(&mut ebpf, SLOTS_MAP)?).map_err(map_err(SLOTS_MAP))?,
            opts.ring_size,
            opts.max_vips,
        );
        let backends = BackendTable::new(
            Array::try_from(take(&mut ebpf, BACKENDS_MAP)?).map_err(map_err(BACKENDS_MAP))?,
        );
        let flows = take_flows(&mut ebpf, &opts)?;
        let tx_ports =
            DevMapHash::try_from(take(&mut ebpf, TX_PORTS_MAP)?).map_err(map_err(TX_PORTS_MAP))?;
        let stats = take_stats(&mut ebpf)?;
        let capture = std::sync::Arc::new(crate::capture::Capturer::from_maps(
            take(&mut ebpf, lb_common::CAPTURE_CONFIG_MAP)?,
            take(&mut ebpf, lb_common::CAPTURE_CPU_MAP)?,
            take(&mut ebpf, lb_common::CAPTURE_RING_MAP)?,
            take(&mut ebpf, lb_common::BSS_MAP)?,
        )?);
        let guard = guard::GuardTables::new(
            take(&mut ebpf, lb_common::ALLOW4_MAP)?,
            take(&mut ebpf, lb_common::ALLOW6_MAP)?,
            take(&mut ebpf, lb_common::DENY4_MAP)?,
            take(&mut ebpf, lb_common::DENY6_MAP)?,
            take(&mut ebpf, lb_common::VIP_RATE_MAP)?,
        )?;
        Ok(Dataplane {
            guard: std::sync::Arc::new(std::sync::Mutex::new(guard)),
            ebpf,
            opts,
            vips,
            slots,
            backends,
            flows,
            tx_ports,
            stats,
            nat,
            nat_sweeper: std::sync::Arc::new(std::sync::Mutex::new(nat_sweeper)),
            capture,
        })
    }
}

/// Attaches only the XDP_PASS program to `iface` (native mode) and loads no other program:
/// `lb xdp-pass` puts it on veth ends that must run XDP for XDP_TX and redirects into them to
/// be delivered, and verifying the load balancer's programs for that only costs seconds of
/// CPU. The object's maps are created at `opts`' sizes (keep them small). Detached when the
/// returned object drops.
pub fn attach_pass_alone(iface: &str, opts: &LoadOptions) -> Result<Ebpf, Error> {
    require_capabilities()?;
    opts.validate()?;
    if if_index(iface).is_none() {
        return Err(Error::NoSuchInterface(iface.to_string()));
    }
    let mut ebpf = open_object(EBPF_OBJECT, opts, None, None)?;
    let prog = xdp_program(&mut ebpf, PASS_PROGRAM)?;
    load_retrying(|| prog.load()).map_err(|source| Error::Program {
        name: PASS_PROGRAM,
        source,
    })?;
    prog.attach(iface, XdpMode::Driver)
        .map_err(|source| Error::Attach {
            iface: iface.to_string(),
            mode: "native",
            hint: "",
            source: Box::new(source),
        })?;
    Ok(ebpf)
}

/// Every map of the object the agent pins.
fn pinned_maps() -> impl Iterator<Item = &'static str> {
    lb_common::LB_MAPS
        .iter()
        .filter(|m| m.pinned)
        .map(|m| m.name)
}

pub(super) fn xdp_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::MissingMap { name })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Runs a program load, again when the verifier was interrupted: the kernel answers EAGAIN
/// when a signal arrives during verification (a child exiting in a busy process), and libbpf
/// retries the same way (up to 5 attempts).
pub fn load_retrying(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut attempts = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts < 5 =>
            {
                attempts += 1;
            }
            done => return done,
        }
    }
}
