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
    let it = Interpreter::new(
        lb_userspace::EBPF_OBJECT,
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

/// A map of the object: its kernel twin (for reads) and its shape.
struct MapRef {
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
struct Insn {
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

/// One ALU operation on `$t` (u64 or u32, `$s` its signed twin), with BPF's rules for a zero
/// divisor (the quotient is 0, the remainder the dividend).
macro_rules! alu_op {
    ($op:expr, $a:expr, $b:expr, $t:ty, $s:ty, $code:expr) => {{
        let (a, b): ($t, $t) = ($a, $b);
        match $op {
            0x00 => a.wrapping_add(b),
            0x10 => a.wrapping_sub(b),
            0x20 => a.wrapping_mul(b),
            0x30 => a.checked_div(b).unwrap_or(0),
            0x40 => a | b,
            0x50 => a & b,
            0x60 => a.wrapping_shl(b as u32),
            0x70 => a.wrapping_shr(b as u32),
            0x80 => (a as $s).wrapping_neg() as $t,
            0x90 => a.checked_rem(b).unwrap_or(a),
            0xa0 => a ^ b,
            0xb0 => b,
            0xc0 => ((a as $s) >> (b as u32 & (<$t>::BITS - 1))) as $t,
            _ => bail!("unsupported alu {:#x}", $code),
        }
    }};
}

/// One run's state: registers, memory regions, call frames and counts.
struct Machine<'a> {
    it: &'a Interpreter,
    regs: [u64; 11],
    /// Region 1 is the context, 2 the packet, then stacks and map values.
    mem: Vec<Vec<u8>>,
    data: u64,
    data_end: u64,
    ifindex: u32,
    frames: Vec<(usize, [u64; 4], u64)>,
    values: HashMap<(usize, Vec<u8>), u64>,
    count: PathCount,
}

const CTX: u64 = 1;
const PACKET: u64 = 2;

fn addr(region: u64, off: usize) -> u64 {
    (region << 32) | off as u64
}

impl<'a> Machine<'a> {
    fn new(it: &'a Interpreter, frame: &[u8], ifindex: u32) -> Self {
        let mut packet = vec![0u8; HEADROOM];
        packet.extend_from_slice(frame);
        let mut m = Self {
            it,
            regs: [0; 11],
            mem: vec![Vec::new(), vec![0; 24], packet],
            data: addr(PACKET, HEADROOM),
            data_end: addr(PACKET, HEADROOM + frame.len()),
            ifindex,
            frames: Vec::new(),
            values: HashMap::new(),
            count: PathCount::default(),
        };
        m.regs[1] = addr(CTX, 0);
        m.regs[10] = m.new_stack();
        m
    }

    fn new_stack(&mut self) -> u64 {
        self.mem.push(vec![0; STACK]);
        addr(self.mem.len() as u64 - 1, STACK)
    }

    fn slice(&mut self, a: u64, len: usize) -> anyhow::Result<&mut [u8]> {
        let (region, off) = ((a >> 32) as usize, (a & 0xffff_ffff) as usize);
        ensure!(
            (2..self.mem.len()).contains(&region),
            "access to {a:#x} (region {region}) is outside the program's memory"
        );
        let r = &mut self.mem[region];
        ensure!(
            off + len <= r.len(),
            "access past the end of region {region}"
        );
        Ok(&mut r[off..off + len])
    }

    fn load(&mut self, a: u64, size: usize) -> anyhow::Result<u64> {
        if a >> 32 == CTX {
            return Ok(match a & 0xffff_ffff {
                0 | 8 => self.data,
                4 => self.data_end,
                12 => u64::from(self.ifindex),
                _ => 0,
            });
        }
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(self.slice(a, size)?);
        Ok(u64::from_le_bytes(b))
    }

    fn store(&mut self, a: u64, size: usize, v: u64) -> anyhow::Result<()> {
        self.slice(a, size)?
            .copy_from_slice(&v.to_le_bytes()[..size]);
        Ok(())
    }

    fn map(&self, v: u64) -> anyhow::Result<usize> {
        ensure!(v & MAP_TAG == MAP_TAG, "{v:#x} is not a map");
        let i = (v & 0xffff) as usize;
        ensure!(i < self.it.maps.len(), "no map {i}");
        Ok(i)
    }

    /// The value region of `key` in map `i`: read from the kernel once, then kept (writes
    /// through the pointer and updates stay here).
    fn value(&mut self, i: usize, key: Vec<u8>) -> anyhow::Result<u64> {
        if let Some(a) = self.values.get(&(i, key.clone())) {
            return Ok(*a);
        }
        let m = &self.it.maps[i];
        ensure!(
            m.kind != MapType::Unspecified,
            "map {} is not the program's",
            m.name
        );
        let Some(v) = self.it.kernel_lookup(m, &key)? else {
            return Ok(0);
        };
        self.mem.push(v);
        let a = addr(self.mem.len() as u64 - 1, 0);
        self.values.insert((i, key), a);
        Ok(a)
    }

    fn helper(&mut self, id: i32) -> anyhow::Result<Option<u64>> {
        let name = match id {
            1 => "map lookup",
            2 => "map update",
            3 => "map delete",
            5 | 160 => "clock",
            7 => "random",
            8 => "cpu id",
            12 => "tail call",
            44 => "head adjust",
            51 => "redirect",
            other => bail!("helper {other} is not emulated"),
        };
        match self.count.helpers.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => self.count.helpers.push((name, 1)),
        }
        let (r1, r2) = (self.regs[1], self.regs[2]);
        Ok(Some(match id {
            1..=3 => {
                let i = self.map(r1)?;
                let key = self.slice(self.regs[2], self.it.maps[i].key_size)?.to_vec();
                if id == 1 {
                    *self
                        .count
                        .lookups
                        .entry(self.it.maps[i].name.clone())
                        .or_default() += 1;
                    self.value(i, key)?
                } else if id == 2 {
                    let v = self
                        .slice(self.regs[3], self.it.maps[i].value_size)?
                        .to_vec();
                    self.mem.push(v);
                    let a = addr(self.mem.len() as u64 - 1, 0);
                    self.values.insert((i, key), a);
                    0
                } else {
                    self.values.insert((i, key), 0);
                    0
                }
            }
            5 | 160 => 1_000_000_000_000,
            7 => 0x1234_5678,
            8 => 0,
            12 => return Ok(None),
            44 => {
                let delta = r2 as i32 as i64;
                let new = self.data as i64 + delta;
                ensure!(
                    new >= addr(PACKET, 0) as i64 && new <= self.data_end as i64 - 14,
                    "head adjustment out of the frame"
                );
                self.data = new as u64;
                0
            }
            51 => 4, // XDP_REDIRECT
            _ => unreachable!(),
        }))
    }

    fn run(mut self) -> anyhow::Result<PathCount> {
        let insns = &self.it.insns;
        let mut pc = 0usize;
        loop {
            ensure!(
                self.count.insns < 1_000_000,
                "no exit after a million instructions"
            );
            let i = *insns.get(pc).context("jumped outside the program")?;
            self.count.insns += 1;
            self.count.trace.push(pc as u32);
            pc += 1;
            let class = i.code & 7;
            let size = match i.code & 0x18 {
                0x00 => 4,
                0x08 => 2,
                0x10 => 1,
                _ => 8,
            };
            match class {
                // ld_imm64: plain, map (fd), map value (fd + offset).
                0 => {
                    ensure!(i.code == 0x18, "unsupported load {:#x}", i.code);
                    let hi = insns.get(pc).context("truncated ld_imm64")?.imm;
                    pc += 1;
                    let lo = i.imm as u32 as u64;
                    self.regs[i.dst] = match i.src {
                        0 => ((hi as u32 as u64) << 32) | lo,
                        1 => MAP_TAG | (i.imm - FD_BASE) as u64,
                        2 => {
                            let m = (i.imm - FD_BASE) as usize;
                            let base = self.value(m, vec![0; 4])?;
                            ensure!(base != 0, "no value for a global");
                            base + hi as u32 as u64
                        }
                        s => bail!("ld_imm64 kind {s} is not emulated"),
                    };
                }
                1 => {
                    ensure!(i.code & 0xe0 == 0x60, "unsupported ldx {:#x}", i.code);
                    let a = self.regs[i.src as usize].wrapping_add(i.off as i64 as u64);
                    self.regs[i.dst] = self.load(a, size)?;
                }
                2 | 3 => {
                    let a = self.regs[i.dst].wrapping_add(i.off as i64 as u64);
                    let v = if class == 2 {
                        i.imm as i64 as u64
                    } else {
                        self.regs[i.src as usize]
                    };
                    match i.code & 0xe0 {
                        0x60 => self.store(a, size, v)?,
                        // Atomic add (without fetch): what `+=` on a shared value may become.
                        0xc0 if i.imm == 0 => {
                            let old = self.load(a, size)?;
                            self.store(a, size, old.wrapping_add(v))?;
                        }
                        _ => bail!("unsupported store {:#x} imm {}", i.code, i.imm),
                    }
                }
                4 | 7 => self.alu(i, class == 7)?,
                5 | 6 => {
                    let op = i.code & 0xf0;
                    if class == 5 && op == 0x80 {
                        if i.src == 1 {
                            // BPF-to-BPF call: a new frame with its own stack.
                            self.count.calls += 1;
                            let saved = [self.regs[6], self.regs[7], self.regs[8], self.regs[9]];
                            self.frames.push((pc, saved, self.regs[10]));
                            self.regs[10] = self.new_stack();
                            pc = (pc as i64 + i.imm as i64) as usize;
                        } else {
                            match self.helper(i.imm)? {
                                Some(v) => self.regs[0] = v,
                                None => {
                                    self.count.action = None;
                                    return self.finish();
                                }
                            }
                        }
                        continue;
                    }
                    if class == 5 && op == 0x90 {
                        match self.frames.pop() {
                            Some((ret, saved, fp)) => {
                                self.regs[6..10].copy_from_slice(&saved);
                                self.regs[10] = fp;
                                pc = ret;
                                continue;
                            }
                            None => {
                                self.count.action = Some(self.regs[0] as u32);
                                return self.finish();
                            }
                        }
                    }
                    let b = if i.code & 8 != 0 {
                        self.regs[i.src as usize]
                    } else {
                        i.imm as i64 as u64
                    };
                    let a = self.regs[i.dst];
                    // JMP32 compares the low halves (signed: as i32).
                    let (a, b, sa, sb) = if class == 6 {
                        let (a, b) = (a as u32, b as u32);
                        (
                            u64::from(a),
                            u64::from(b),
                            i64::from(a as i32),
                            i64::from(b as i32),
                        )
                    } else {
                        (a, b, a as i64, b as i64)
                    };
                    let taken = match op {
                        0x00 => true,
                        0x10 => a == b,
                        0x20 => a > b,
                        0x30 => a >= b,
                        0x40 => a & b != 0,
                        0x50 => a != b,
                        0x60 => sa > sb,
                        0x70 => sa >= sb,
                        0xa0 => a < b,
                        0xb0 => a <= b,
                        0xc0 => sa < sb,
                        0xd0 => sa <= sb,
                        _ => bail!("unsupported jump {:#x}", i.code),
                    };
                    if taken {
                        pc = (pc as i64 + i.off as i64) as usize;
                    }
                }
                _ => unreachable!(),
            }
        }
    }

    fn alu(&mut self, i: Insn, wide: bool) -> anyhow::Result<()> {
        let op = i.code & 0xf0;
        let x = i.code & 8 != 0;
        if op == 0xd0 {
            // Byte swap: to big endian (swap on this little-endian host) or to little.
            let v = self.regs[i.dst];
            self.regs[i.dst] = match (x, i.imm) {
                (true, 16) => u64::from((v as u16).swap_bytes()),
                (true, 32) => u64::from((v as u32).swap_bytes()),
                (true, 64) => v.swap_bytes(),
                (false, 16) => v & 0xffff,
                (false, 32) => v & 0xffff_ffff,
                (false, 64) => v,
                _ => bail!("unsupported byte swap"),
            };
            return Ok(());
        }
        let b = if x {
            self.regs[i.src as usize]
        } else {
            i.imm as i64 as u64
        };
        let a = self.regs[i.dst];
        let v = if wide {
            alu_op!(op, a, b, u64, i64, i.code)
        } else {
            u64::from(alu_op!(op, a as u32, b as u32, u32, i32, i.code))
        };
        self.regs[i.dst] = v;
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<PathCount> {
        let (start, end) = (
            (self.data & 0xffff_ffff) as usize,
            (self.data_end & 0xffff_ffff) as usize,
        );
        self.count.frame = self.mem[PACKET as usize][start..end].to_vec();
        Ok(self.count)
    }
}
