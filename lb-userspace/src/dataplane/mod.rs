//! Loading the eBPF object, attaching it, and owning its maps as typed tables.
mod attach;
pub mod batch;
pub mod egress;
pub mod guard;
pub mod kernel;
pub mod migrate;
pub mod nat;
pub mod pins;
pub mod publish;
pub mod rawmap;
pub mod stats;
pub mod tables;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, xdp::DevMapHash},
    programs::{Xdp, XdpMode},
};
use lb_common::{
    BACKEND_STATS_MAP, BACKENDS_MAP, CONFIG_GLOBAL, Capacity, DEFAULT_FLOW_ENTRIES,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, FLOW_STATS_MAP, FLOW_TABLE_PER_CPU, FLOW_TABLE_SHARED,
    FLOWS_MAP, FLOWS_NEW_MAP, FLOWS_PERCPU_MAP, LbConfig, SLOTS_MAP, STATS_MAP, TX_PORTS_MAP,
    VIP_FILTER_MAP, VIP_INFO_MAP, VIP_STATS_MAP, VIPS_MAP,
};
use std::path::{Path, PathBuf};

pub use self::attach::attach_xdp_pinned;
use self::{
    stats::StatsMaps,
    tables::{BackendTable, FlowTable, SlotTable, VipTable},
};
use crate::{EBPF_OBJECT, Error, LB_PROGRAM, PASS_PROGRAM};

/// How to attach the program to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Driver (native) mode: fastest; the driver must support XDP.
    Native,
    /// Generic (skb) mode: works on any interface, slower.
    Generic,
    /// Native, falling back to generic when the driver refuses.
    Auto,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
            AttachMode::Auto => "auto",
        }
    }
}

/// Map sizes and constants fixed when the program is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Slot-table size M; must be prime.
    pub ring_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_entries: u32,
    pub hash_seed: u64,
    /// Shared LRU (default) or one LRU per CPU.
    pub per_cpu_flows: bool,
    /// No flow table at all (`--flow-table off`): every packet placed by the slot table.
    pub flow_table_off: bool,
    /// Seconds a TCP flow entry lives after a FIN once the flow is quiet.
    pub fin_grace_s: u32,
    /// UDP port of GUE packets (host order).
    pub gue_port: u16,
    /// IPIP over IPv4: per-flow outer sources from this /16 (its first two bytes).
    pub ipip_prefix4: Option<std::net::Ipv4Addr>,
    /// IPIP over IPv6: per-flow outer sources from this /64 (its first eight bytes).
    pub ipip_prefix6: Option<std::net::Ipv6Addr>,
    /// NAT source ports (host order, inclusive).
    pub nat_ports: (u16, u16),
    /// Slots per CPU of the flow cache in front of the established table (a power of two);
    /// 0: none.
    pub flow_cache_slots: u32,
    /// NAT: established connections the tables hold (`--nat-entries`).
    pub nat_entries: u32,
    /// NAT: seconds a half-open pair lives (`--nat-half-open`).
    pub nat_half_open_s: u32,
    /// NAT: seconds an established TCP connection lives idle (`--nat-tcp-idle`).
    pub nat_tcp_idle_s: u32,
    /// NAT: seconds a connection closed without a backend TIME_WAIT keeps its port
    /// (`--nat-close-grace`).
    pub nat_grace_s: u32,
    /// NAT: percent of the half-open slots one source may hold (`--nat-half-open-share`).
    pub nat_half_share_pct: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ring_size: LbConfig::DEFAULT.ring_size,
            max_vips: DEFAULT_MAX_VIPS,
            max_backends: DEFAULT_MAX_BACKENDS,
            flow_entries: DEFAULT_FLOW_ENTRIES,
            hash_seed: LbConfig::DEFAULT.hash_seed,
            per_cpu_flows: false,
            flow_table_off: false,
            fin_grace_s: lb_common::DEFAULT_FIN_GRACE_S,
            gue_port: lb_common::DEFAULT_GUE_PORT,
            ipip_prefix4: None,
            ipip_prefix6: None,
            nat_ports: (
                lb_common::DEFAULT_NAT_PORT_MIN,
                lb_common::DEFAULT_NAT_PORT_MAX,
            ),
            flow_cache_slots: lb_common::DEFAULT_FLOW_CACHE_SLOTS,
            nat_entries: lb_common::DEFAULT_NAT_ENTRIES,
            nat_half_open_s: lb_common::DEFAULT_NAT_HALF_OPEN_S,
            nat_tcp_idle_s: lb_common::DEFAULT_NAT_TCP_IDLE_S,
            nat_grace_s: lb_common::DEFAULT_NAT_GRACE_S,
            nat_half_share_pct: lb_common::DEFAULT_NAT_HALF_SHARE_PCT,
        }
    }
}

impl LoadOptions {
    /// The number of entries capacity `c` gives under these options.
    pub fn capacity(&self, c: Capacity) -> Result<u32, Error> {
        let (shared, per_cpu) = self.flow_table_entries();
        Ok(match c {
            Capacity::Fixed(n) => n,
            Capacity::MaxVips => self.max_vips,
            Capacity::MaxBackends => self.max_backends,
            Capacity::SlotTables => self.max_vips * 2 * self.ring_size,
            Capacity::SharedFlows => shared,
            Capacity::PerCpuFlows => per_cpu,
            Capacity::Probation => self.probation_entries(),
            Capacity::FlowCache => cache_entries(self.cache_slots())?,
            Capacity::NatPairs => self.nat_entries + self.nat_half_slots(),
            Capacity::NatHalfOpen => self.nat_half_slots(),
        })
    }

    /// NAT half-open slots: a quarter of `--nat-entries` rounded up to a power of two (at
    /// least 256; the program masks a hash with it).
    pub fn nat_half_slots(&self) -> u32 {
        (self.nat_entries / 4).max(256).next_power_of_two()
    }

    /// Half-open slots one source address may hold: its share, at least the slots a new
    /// connection tries.
    pub fn nat_half_share(&self) -> u32 {
        let share = u64::from(self.nat_half_slots()) * u64::from(self.nat_half_share_pct) / 100;
        (share as u32).max(lb_common::NAT_HALF_PROBES)
    }

    /// Slots of the probation table: a quarter of the flow table rounded up to a power of
    /// two (at least 256; the program masks the flow's hash with it); one without a flow
    /// table.
    pub fn probation_entries(&self) -> u32 {
        if self.flow_table_off {
            1
        } else {
            (self.flow_entries / 4).max(256).next_power_of_two()
        }
    }

    /// Entries of the shared and the per-CPU-lists flow tables: the one not in use (both
    /// without a flow table) shrinks to one entry.
    pub fn flow_table_entries(&self) -> (u32, u32) {
        if self.flow_table_off {
            (1, 1)
        } else if self.per_cpu_flows {
            (1, self.flow_entries)
        } else {
            (self.flow_entries, 1)
        }
    }

    /// Slots per CPU of the flow cache in use: none without a flow table.
    pub fn cache_slots(&self) -> u32 {
        if self.flow_table_off {
            0
        } else {
            self.flow_cache_slots
        }
    }

    /// Checks the sizes before anything touches the kernel.
    pub fn validate(&self) -> Result<(), Error> {
        if !crate::maglev::is_prime(self.ring_size) {
            return Err(Error::Invalid(format!(
                "slot table size {} is not prime: pick a prime such as 65537 or 16381",
                self.ring_size
            )));
        }
        if self.flow_table_off && self.per_cpu_flows {
            return Err(Error::Invalid(
                "--per-cpu-flows shapes a flow table; with --flow-table off there is none".into(),
            ));
        }
        let (lo, hi) = self.nat_ports;
        if lo == 0 || lo > hi {
            return Err(Error::Invalid(format!(
                "NAT port range {lo}-{hi}: give LOW-HIGH with 1 <= LOW <= HIGH"
            )));
        }
        let c = self.flow_cache_slots;
        if c != 0 && (!c.is_power_of_two() || c > lb_common::MAX_FLOW_CACHE_SLOTS) {
            return Err(Error::Invalid(format!(
                "flow cache of {c} slots per CPU: give 0 (no cache) or a power of two up to {}",
                lb_common::MAX_FLOW_CACHE_SLOTS
            )));
        }
        validate_nat(self)?;
        if self.gue_port == 0 {
            return Err(Error::Invalid("the GUE port must not be 0".into()));
        }
        if self.max_vips == 0 || self.max_backends < 2 || self.flow_entries == 0 {
            return Err(Error::Invalid(
                "max VIPs, flow entries and max backends (>= 2) must be positive".into(),
            ));
        }
        let slots = u64::from(self.max_vips) * 2 * u64::from(self.ring_size);
        if slots > u64::from(u32::MAX) / 4 {
            return Err(Error::Invalid(format!(
                "{} VIPs x 2 x {} slots is too large for one slot array: lower one of them",
                self.max_vips, self.ring_size
            )));
        }
        Ok(())
    }

    pub fn config(&self) -> LbConfig {
        LbConfig {
            ring_size: self.ring_size,
            flow_table: if self.flow_table_off {
                lb_common::FLOW_TABLE_OFF
            } else if self.per_cpu_flows {
                FLOW_TABLE_PER_CPU
            } else {
                FLOW_TABLE_SHARED
            },
            hash_seed: self.hash_seed,
            fin_grace_s: self.fin_grace_s,
            gue_port: self.gue_port.to_be(),
            _pad0: 0,
            ipip_src_prefix4: self
                .ipip_prefix4
                .map_or(0, |p| u32::from_ne_bytes(p.octets())),
            probation_slots: self.probation_entries(),
            ipip_src_prefix6: self.ipip_prefix6.map_or([0; 4], |p| {
                let w = crate::net::addr_words(p.into());
                [w[0], w[1], 0, 0]
            }),
            nat_port_min: self.nat_ports.0,
            nat_port_max: self.nat_ports.1,
            flow_cache_slots: self.cache_slots(),
            nat_half_slots: self.nat_half_slots(),
            nat_half_share: self.nat_half_share(),
            nat_half_open_s: self.nat_half_open_s,
            nat_tcp_idle_s: self.nat_tcp_idle_s,
            nat_grace_s: self.nat_grace_s,
            _pad1: 0,
        }
    }
}

/// Most `--nat-entries` accepted: two hash entries of about 180 bytes per connection, so
/// this many need about 24 GB of kernel memory; the kernel refuses less than that on most
/// machines, and its refusal is reported with the option's name.
pub const MAX_NAT_ENTRIES: u32 = 1 << 26;

/// The NAT options' checks.
fn validate_nat(o: &LoadOptions) -> Result<(), Error> {
    if o.nat_entries == 0 || o.nat_entries > MAX_NAT_ENTRIES {
        return Err(Error::Invalid(format!(
            "--nat-entries {}: give 1 to {MAX_NAT_ENTRIES}",
            o.nat_entries
        )));
    }
    if o.nat_half_open_s == 0 || o.nat_tcp_idle_s == 0 || o.nat_grace_s == 0 {
        return Err(Error::Invalid(
            "--nat-half-open, --nat-tcp-idle and --nat-close-grace must be at least 1 second"
                .into(),
        ));
    }
    if o.nat_half_open_s > o.nat_tcp_idle_s {
        return Err(Error::Invalid(format!(
            "--nat-half-open {} s is longer than --nat-tcp-idle {} s: a handshake would outlive an idle connection",
            o.nat_half_open_s, o.nat_tcp_idle_s
        )));
    }
    if !(1..=100).contains(&o.nat_half_share_pct) {
        return Err(Error::Invalid(format!(
            "--nat-half-open-share {}: give a percentage from 1 to 100",
            o.nat_half_share_pct
        )));
    }
    Ok(())
}

/// The loaded eBPF object: its programs and its maps as typed tables.
pub struct Dataplane {
    ebpf: Ebpf,
    pub opts: LoadOptions,
    pub vips: VipTable,
    pub slots: SlotTable,
    pub backends: BackendTable,
    pub flows: FlowTable,
    pub tx_ports: DevMapHash<MapData>,
    pub stats: StatsMaps,
    pub nat: nat::NatTables,
    /// The NAT sweep's own handles: it runs without the agent's lock.
    pub nat_sweeper: std::sync::Arc<std::sync::Mutex<nat::NatSweeper>>,
    /// Packet capture's maps (`lb capture`): used without the agent's lock.
    pub capture: std::sync::Arc<crate::capture::Capturer>,
    /// The guard's source lists: shared, so a large list's entries are written before the
    /// agent's lock is taken for the change (`Kernel::guard_writer`).
    pub guard: std::sync::Arc<std::sync::Mutex<guard::GuardTables>>,
}

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
    /// The guard's tries and limits, locked (a panic elsewhere leaves them usable: every
    /// write there is a whole batch call, and failures are read back).
    pub fn guard(&self) -> std::sync::MutexGuard<'_, guard::GuardTables> {
        self.guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads the embedded object into the kernel (the verifier runs here), sized by `opts`.
    pub fn load(opts: LoadOptions) -> Result<Self, Error> {
        Self::load_with_pins(opts, None)
    }

    /// As [`Dataplane::load`], with every map pinned under `pin_dir` (bpffs). Maps already
    /// pinned there are reused as they are, flows and counters included: check them first
    /// with [`pins::check`].
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
        let vips = VipTable::new(
            HashMap::try_from(take(&mut ebpf, VIPS_MAP)?).map_err(map_err(VIPS_MAP))?,
            Array::try_from(take(&mut ebpf, VIP_INFO_MAP)?).map_err(map_err(VIP_INFO_MAP))?,
            Array::try_from(take(&mut ebpf, VIP_FILTER_MAP)?).map_err(map_err(VIP_FILTER_MAP))?,
            Array::try_from(take(&mut ebpf, lb_common::VIP_INDEX_MAP)?)
                .map_err(map_err(lb_common::VIP_INDEX_MAP))?,
            nat_filtered,
        )?;
        let slots = SlotTable::new(
            Array::try_from(take(&mut ebpf, SLOTS_MAP)?).map_err(map_err(SLOTS_MAP))?,
            opts.ring_size,
            opts.max_vips,
        );
        let backends = BackendTable::new(
            Array::try_from(take(&mut ebpf, BACKENDS_MAP)?).map_err(map_err(BACKENDS_MAP))?,
        );
        let flows_map = if opts.per_cpu_flows {
            FLOWS_PERCPU_MAP
        } else {
            FLOWS_MAP
        };
        let flows = FlowTable::new(
            HashMap::try_from(take(&mut ebpf, flows_map)?).map_err(map_err(flows_map))?,
            opts.hash_seed,
            Array::try_from(take(&mut ebpf, FLOWS_NEW_MAP)?).map_err(map_err(FLOWS_NEW_MAP))?,
            Array::try_from(take(&mut ebpf, lb_common::FLOW_CACHE_MAP)?)
                .map_err(map_err(lb_common::FLOW_CACHE_MAP))?,
            opts.cache_slots(),
        );
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

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The loaded object (for reading its programs' info, such as the verifier's figures).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The load-balancing program (for attaching or `BPF_PROG_TEST_RUN`).
    pub fn lb_program(&mut self) -> Result<&mut Xdp, Error> {
        xdp_program(&mut self.ebpf, LB_PROGRAM)
    }

    /// The trivial XDP_PASS program (for veth peers and benchmark floors).
    pub fn pass_program(&mut self) -> Result<&mut Xdp, Error> {
        xdp_program(&mut self.ebpf, PASS_PROGRAM)
    }

    /// Loads (once) and returns another XDP program of the object by name, such as the
    /// `bench_*` harnesses used by `cargo xtask bench`.
    pub fn extra_program(&mut self, name: &'static str) -> Result<&mut Xdp, Error> {
        let prog = xdp_program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            load_retrying(|| prog.load()).map_err(|source| Error::Program { name, source })?;
        }
        Ok(prog)
    }

    /// Attaches the load-balancing program to `iface` through a bpf_link pinned at
    /// `link_pin`, so it keeps forwarding when this process ends. If a link is pinned there
    /// already, the running program is replaced by this one in one step (nothing is dropped).
    /// Returns the mode of a new attachment, or `None` when an existing one was adopted.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        link_pin: &Path,
    ) -> Result<Option<AttachMode>, Error> {
        attach_xdp_pinned(self.lb_program()?, LB_PROGRAM, iface, mode, link_pin)
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

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// Entries of the flow cache's array: a region of `slots` per possible CPU (one slot when
/// there is no cache: a map cannot be empty).
fn cache_entries(slots: u32) -> Result<u32, Error> {
    if slots == 0 {
        return Ok(1);
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs")(e))?;
    u32::try_from(cpus)
        .ok()
        .and_then(|c| c.checked_mul(slots))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "a flow cache of {slots} slots per CPU on {cpus} CPUs is more than 2^32 slots: give fewer slots"
            ))
        })
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::MissingMap { name })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// The interface index of `iface`, if it exists.
pub fn if_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// The capabilities the agent needs, and why (found by running it with less, see the
/// `service` test): `CAP_BPF` creates maps and loads programs; `CAP_NET_ADMIN` loads
/// networking programs (XDP) and attaches them to a link; `CAP_PERFMON` because without it
/// the verifier refuses pointer arithmetic between packet pointers ("R8 pointer -= pointer
/// prohibited": the program computes the frame length as `data_end - data`). Nothing else:
/// no `CAP_SYS_ADMIN` (bpffs is mounted beforehand, by systemd or by root), no root uid
/// (the agent only needs to own its bpffs directory, state file and socket directory).
pub const CAPABILITIES: [caps::Capability; 3] = [
    caps::Capability::CAP_BPF,
    caps::Capability::CAP_NET_ADMIN,
    caps::Capability::CAP_PERFMON,
];

/// Fails with the missing ones unless this process holds [`CAPABILITIES`] (effective set).
pub fn require_capabilities() -> Result<(), Error> {
    let have = caps::read(None, caps::CapSet::Effective)
        .map_err(|e| Error::Kernel(format!("reading this process's capabilities: {e}")))?;
    let missing: Vec<String> = CAPABILITIES
        .iter()
        .filter(|c| !have.contains(c))
        .map(|c| c.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::NotPrivileged(missing.join(", ")))
    }
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

#[cfg(test)]
mod tests {
    use super::LoadOptions;

    #[test]
    fn the_flow_cache_is_a_power_of_two_or_none() {
        for slots in [0, 1, 4096, lb_common::MAX_FLOW_CACHE_SLOTS] {
            let opts = LoadOptions {
                flow_cache_slots: slots,
                ..LoadOptions::default()
            };
            assert!(opts.validate().is_ok(), "{slots}");
            assert_eq!(opts.config().flow_cache_slots, slots);
        }
        for slots in [3, 4095, lb_common::MAX_FLOW_CACHE_SLOTS * 2] {
            let opts = LoadOptions {
                flow_cache_slots: slots,
                ..LoadOptions::default()
            };
            let e = opts.validate().expect_err("refused").to_string();
            assert!(e.contains("power of two"), "{e}");
        }
        // Without a flow table there is nothing to cache.
        let off = LoadOptions {
            flow_table_off: true,
            ..LoadOptions::default()
        };
        assert_eq!(off.config().flow_cache_slots, 0);
    }

    #[test]
    fn nat_options_are_checked_and_sized() {
        let d = LoadOptions::default();
        assert_eq!((d.nat_half_slots(), d.nat_half_share()), (16384, 1638));
        let c = d.config();
        assert_eq!((c.nat_half_slots, c.nat_half_share), (16384, 1638));
        assert_eq!(
            d.capacity(lb_common::Capacity::NatPairs).ok(),
            Some(65536 + 16384)
        );
        // Small tables: at least 256 slots, and a share of at least the slots a SYN tries.
        let small = LoadOptions {
            nat_entries: 100,
            nat_half_share_pct: 1,
            ..d
        };
        assert_eq!((small.nat_half_slots(), small.nat_half_share()), (256, 4));
        for (bad, what) in [
            (
                LoadOptions {
                    nat_entries: 0,
                    ..d
                },
                "--nat-entries 0",
            ),
            (
                LoadOptions {
                    nat_entries: super::MAX_NAT_ENTRIES + 1,
                    ..d
                },
                "--nat-entries",
            ),
            (
                LoadOptions {
                    nat_half_open_s: 0,
                    ..d
                },
                "at least 1 second",
            ),
            (
                LoadOptions {
                    nat_half_open_s: 1000,
                    ..d
                },
                "longer than --nat-tcp-idle",
            ),
            (
                LoadOptions {
                    nat_half_share_pct: 101,
                    ..d
                },
                "--nat-half-open-share 101",
            ),
        ] {
            let e = bad.validate().expect_err(what).to_string();
            assert!(e.contains(what) && !e.contains('\n'), "{e}");
        }
    }
}
