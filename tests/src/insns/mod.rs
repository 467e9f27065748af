//! Instructions per path: the load balancer's eBPF program run on one frame by a small
//! interpreter of the BPF instruction set, counting what it executes. This host's VM exposes
//! no hardware performance counters (`bpftool prog profile` has nothing to read), so the
//! benchmark's "where the time goes" rests on executed instruction and helper-call counts per
//! path plus the measured stage rows.
//!
//! The interpreter runs the same object the agent loads (relocated by `aya-obj` as aya does),
//! and reads map contents from the live kernel maps of a loaded program (by map id): nothing
//! is written to the kernel (updates and deletes land in a local copy). Every count is checked
//! against the kernel: the frame is also run through BPF_PROG_TEST_RUN, and the action and
//! output bytes must be equal, or the count is refused.
mod machine;

use machine::Machine;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use aya::maps::{MapInfo, MapType};

/// What one run executed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PathCount {
    /// BPF instructions executed (a 16-byte `ld_imm64` counts once).
    pub insns: u32,
    /// Helper calls by name, in the order of first use.
    pub helpers: Vec<(&'static str, u32)>,
    /// Map lookups by map name.
    pub lookups: BTreeMap<String, u32>,
    /// The XDP action, or `None` when the run ended in a tail call.
    pub action: Option<u32>,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Index of every instruction executed, in order (for `INSNS_TRACE`).
    pub trace: Vec<u32>,
    /// BPF-to-BPF calls made (functions the compiler did not inline, e.g. `memmove`).
    pub calls: u32,
}

impl PathCount {
    /// "2 lookup, 1 ktime" style summary of the helper calls.
    pub fn helper_summary(&self) -> String {
        if self.helpers.is_empty() {
            return "none".into();
        }
        self.helpers
            .iter()
            .map(|(n, c)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Counts `frame` through the load-balancing program of `world`, and checks the count
/// against the kernel: the kernel's run of the same frame must give the same action and
/// output bytes. The counter only reads the maps, so it runs first (the kernel's run may then
/// change the tables, as this packet does).
pub fn count_checked(world: &mut crate::world::World, frame: &[u8]) -> anyhow::Result<PathCount> {
    // The counter runs as CPU 0 (per-CPU maps read as CPU 0's values, the CPU id helper
    // gives 0, so CPU 0's region of the flow cache): the kernel's runs of this thread
    // (BPF_PROG_TEST_RUN runs on the caller's CPU) happen there too.
    crate::world::pin_to_cpu0()?;
    let it = Interpreter::new(
        crate::world::lb_object(),
        lb_userspace::LB_PROGRAM,
        world.dp.lb_program()?,
    )?;
    let count = it.run(frame, 1)?;
    let (action, out) = world.run(frame)?;
    ensure!(
        count.action == Some(action) && count.frame == out,
        "the instruction counter disagrees with the kernel (action {:?} vs {action})",
        count.action
    );
    Ok(count)
}

/// As [`count_checked`] for a packet of a flow this CPU's flow cache holds (filled by the
/// previous run): counted again once if the coarse clock ticked in between, so the count is
/// the cache's path (the kernel's run of the first count filled the slot again).
pub fn count_cached(world: &mut crate::world::World, frame: &[u8]) -> anyhow::Result<PathCount> {
    let count = count_checked(world, frame)?;
    if count.lookups.contains_key(lb_common::FLOWS_MAP) {
        return count_checked(world, frame);
    }
    Ok(count)
}

/// A map of the object: its kernel twin (for reads) and its shape.
pub(super) struct MapRef {
    name: String,
    fd: OwnedFd,
    kind: MapType,
    key_size: usize,
    value_size: usize,
}

/// One program of the object, relocated, with the kernel maps it reads.
pub struct Interpreter {
    insns: Vec<Insn>,
    maps: Vec<MapRef>,
    cpus: usize,
}

#[derive(Clone, Copy)]
pub(super) struct Insn {
    code: u8,
    dst: usize,
    src: u8,
    off: i16,
    imm: i32,
}

/// Fake map fds written into the relocated instructions: index + this.
const FD_BASE: i32 = 1 << 20;
/// Values standing for "pointer to map N" in registers (never dereferenced).
const MAP_TAG: u64 = 0xffff_0000_0000_0000;
/// Headroom before the frame, for `bpf_xdp_adjust_head`.
const HEADROOM: usize = 256;
const STACK: usize = 512;

impl Interpreter {
    /// `program` of `object`, reading the maps of `loaded` (the same object loaded into the
    /// kernel: maps matched by name).
    pub fn new(object: &[u8], program: &str, loaded: &aya::programs::Xdp) -> anyhow::Result<Self> {
        let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
        let defs: Vec<(String, aya_obj::Map)> = obj
            .maps
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(
            defs.iter()
                .enumerate()
                .map(|(i, (name, def))| (name.as_str(), FD_BASE + i as i32, def)),
            &text,
        )
        .context("relocating maps")?;
        obj.relocate_calls(&text).context("relocating calls")?;
        let prog = obj
            .programs
            .get(program)
            .with_context(|| format!("no program {program}"))?;
        let func = obj
            .functions
            .get(&prog.function_key())
            .context("the program's function")?;
        let insns = func
            .instructions
            .iter()
            .map(|i| Insn {
                code: i.code,
                dst: usize::from(i.dst_reg()),
                src: i.src_reg(),
                off: i.off,
                imm: i.imm,
            })
            .collect();
        // The kernel's maps of the loaded program, by (truncated) name.
        let ids = loaded
            .info()
            .context("program info")?
            .map_ids()
            .context("map ids")?
            .unwrap_or_default();
        let mut live = HashMap::new();
        for id in ids {
            let info = MapInfo::from_id(id).context("map info")?;
            let name = info.name_as_str().unwrap_or_default().to_string();
            live.insert(name, info);
        }
        let mut maps = Vec::new();
        for (name, _) in &defs {
            let short: String = name.chars().take(15).collect();
            let Some(info) = live.get(&short) else {
                // Not used by this program: any reference to it fails at run time.
                maps.push(None);
                continue;
            };
            maps.push(Some(MapRef {
                name: name.clone(),
                fd: info.fd().context("map fd")?.as_fd().try_clone_to_owned()?,
                kind: info.map_type().context("map type")?,
                key_size: info.key_size() as usize,
                value_size: info.value_size() as usize,
            }));
        }
        let maps = maps
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.unwrap_or_else(|| MapRef {
                    name: defs[i].0.clone(),
                    fd: std::fs::File::open("/dev/null").expect("/dev/null").into(),
                    kind: MapType::Unspecified,
                    key_size: 0,
                    value_size: 0,
                })
            })
            .collect();
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        Ok(Self { insns, maps, cpus })
    }

    /// Runs the program on `frame` received on `ifindex`.
    pub fn run(&self, frame: &[u8], ifindex: u32) -> anyhow::Result<PathCount> {
        Machine::new(self, frame, ifindex).run()
    }

    /// Reads `key` of map `m` from the kernel (CPU 0's value for per-CPU maps).
    fn kernel_lookup(&self, m: &MapRef, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        let per_cpu = matches!(
            m.kind,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        );
        let stride = m.value_size.div_ceil(8) * 8;
        let mut value = vec![
            0u8;
            if per_cpu {
                stride * self.cpus
            } else {
                m.value_size
            }
        ];
        #[repr(C)]
        struct Attr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let attr = Attr {
            map_fd: m.fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: BPF_MAP_LOOKUP_ELEM (1) with a key of the map's key size and a value buffer
        // of its value size (times the CPUs for per-CPU maps), both alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                1,
                &attr as *const Attr,
                std::mem::size_of::<Attr>(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(None);
            }
            bail!("reading {}: {e}", m.name);
        }
        value.truncate(m.value_size);
        Ok(Some(value))
    }
}

/// The kernel verifier's budget: instructions it may process while verifying one program
/// (`BPF_COMPLEXITY_LIMIT_INSNS`); a program past it is refused ("BPF program is too large").
pub const VERIFIER_LIMIT: u32 = 1_000_000;

/// One loaded program's verifier figure: the instructions the kernel's verifier processed
/// (`verified_insns` of `bpf_prog_info`, as `bpftool prog show` prints it).
#[derive(Debug, Clone)]
pub struct Verified {
    /// The object and the load options it was loaded under.
    pub load: &'static str,
    pub program: String,
    pub insns: u32,
}

impl Verified {
    /// The share of [`VERIFIER_LIMIT`] it uses, in percent.
    pub fn percent(&self) -> f64 {
        f64::from(self.insns) * 100.0 / f64::from(VERIFIER_LIMIT)
    }
}

/// The verifier figure of every loaded program of `ebpf` (harnesses never loaded have none).
fn verified_of(load: &'static str, ebpf: &aya::Ebpf) -> anyhow::Result<Vec<Verified>> {
    let mut out = Vec::new();
    for (name, prog) in ebpf.programs() {
        if prog.fd().is_err() {
            continue;
        }
        let info = prog
            .info()
            .with_context(|| format!("reading {name}'s info"))?;
        let insns = info
            .verified_instruction_count()
            .with_context(|| format!("the kernel gave no verified_insns for {name}"))?;
        out.push(Verified {
            load,
            program: name.to_string(),
            insns,
        });
    }
    out.sort_by(|a, b| a.program.cmp(&b.program));
    Ok(out)
}

/// The verifier figure of every program the agent and `lb decap` load, freshly loaded
/// (root): the load balancer's object under each load-time configuration that changes which
/// code the verifier walks (the configuration is read-only data, so the verifier skips the
/// branches it rules out: a shared or per-CPU flow table, none, no flow cache), and the
/// backends' decap object.
pub fn verified_counts() -> anyhow::Result<Vec<Verified>> {
    use lb_userspace::LoadOptions;
    let base = crate::world::World::options;
    let mut out = Vec::new();
    for (load, opts) in [
        ("lb, shared flow table", base()),
        (
            "lb, per-CPU flow table",
            LoadOptions {
                per_cpu_flows: true,
                ..base()
            },
        ),
        (
            "lb, flow table off",
            LoadOptions {
                flow_table_off: true,
                ..base()
            },
        ),
        (
            "lb, no flow cache",
            LoadOptions {
                flow_cache_slots: 0,
                ..base()
            },
        ),
    ] {
        let dp = lb_userspace::Dataplane::load(opts).with_context(|| format!("loading {load}"))?;
        out.extend(verified_of(load, dp.ebpf())?);
    }
    let local = [std::net::IpAddr::from([10, 1, 0, 1])].into();
    let decap = lb_userspace::decap::load(lb_common::DEFAULT_GUE_PORT, &local, None)
        .context("loading the decap object")?;
    out.extend(verified_of("decap", &decap)?);
    Ok(out)
}
