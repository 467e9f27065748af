//! The interpreter proper: registers, memory regions (context, frame, stacks, map values),
//! BPF-to-BPF call frames, the helpers the load balancer's paths call, and the counts.
use std::collections::HashMap;

use anyhow::{Context as _, bail, ensure};
use aya::maps::MapType;

use super::{FD_BASE, HEADROOM, Insn, Interpreter, MAP_TAG, PathCount, STACK};

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

/// Where a jump leaves the run: the next instruction, or the end (the XDP action, or `None`
/// for a tail call).
enum Next {
    At(usize),
    Exit(Option<u32>),
}

/// One run's state: registers, memory regions, call frames and counts.
pub(super) struct Machine<'a> {
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
    pub(super) fn new(it: &'a Interpreter, frame: &[u8], ifindex: u32) -> Self {
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
            118 => "jiffies",
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
            // The kernel's clocks (the flow cache's second must match what the kernel's run
            // wrote): 5 is bpf_ktime_get_ns, 160 bpf_ktime_get_coarse_ns.
            5 => clock_ns(libc::CLOCK_MONOTONIC),
            160 => clock_ns(libc::CLOCK_MONOTONIC_COARSE),
            // bpf_jiffies64 (the flow cache's tick).
            118 => jiffies()?,
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

    pub(super) fn run(mut self) -> anyhow::Result<PathCount> {
        let mut pc = 0usize;
        loop {
            ensure!(
                self.count.insns < 1_000_000,
                "no exit after a million instructions"
            );
            let i = *self
                .it
                .insns
                .get(pc)
                .context("jumped outside the program")?;
            self.count.insns += 1;
            self.count.trace.push(pc as u32);
            pc += 1;
            match i.code & 7 {
                0 => pc = self.ld_imm64(i, pc)?,
                class @ 1..=3 => self.memory(i, class)?,
                class @ (4 | 7) => self.alu(i, class == 7)?,
                class => match self.jump(i, class == 6, pc)? {
                    Next::At(next) => pc = next,
                    Next::Exit(action) => {
                        self.count.action = action;
                        return self.finish();
                    }
                },
            }
        }
    }

    /// `ld_imm64`: a plain constant, a map (fd), or the address in a map value (fd + offset,
    /// how globals are reached). Returns the pc after its second half.
    fn ld_imm64(&mut self, i: Insn, pc: usize) -> anyhow::Result<usize> {
        ensure!(i.code == 0x18, "unsupported load {:#x}", i.code);
        let hi = self.it.insns.get(pc).context("truncated ld_imm64")?.imm;
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
        Ok(pc + 1)
    }

    /// Loads (class 1) and stores of a register (3) or an immediate (2).
    fn memory(&mut self, i: Insn, class: u8) -> anyhow::Result<()> {
        let size = match i.code & 0x18 {
            0x00 => 4,
            0x08 => 2,
            0x10 => 1,
            _ => 8,
        };
        if class == 1 {
            ensure!(i.code & 0xe0 == 0x60, "unsupported ldx {:#x}", i.code);
            let a = self.regs[i.src as usize].wrapping_add(i.off as i64 as u64);
            self.regs[i.dst] = self.load(a, size)?;
            return Ok(());
        }
        let a = self.regs[i.dst].wrapping_add(i.off as i64 as u64);
        let v = if class == 2 {
            i.imm as i64 as u64
        } else {
            self.regs[i.src as usize]
        };
        match i.code & 0xe0 {
            0x60 => self.store(a, size, v),
            // Atomic add (without fetch): what `+=` on a shared value may become.
            0xc0 if i.imm == 0 => {
                let old = self.load(a, size)?;
                self.store(a, size, old.wrapping_add(v))
            }
            _ => bail!("unsupported store {:#x} imm {}", i.code, i.imm),
        }
    }

    /// Jumps (JMP32 compares the low halves), calls and exits.
    fn jump(&mut self, i: Insn, narrow: bool, pc: usize) -> anyhow::Result<Next> {
        let op = i.code & 0xf0;
        if !narrow && op == 0x80 {
            if i.src == 1 {
                // BPF-to-BPF call: a new frame with its own stack.
                self.count.calls += 1;
                let saved = [self.regs[6], self.regs[7], self.regs[8], self.regs[9]];
                self.frames.push((pc, saved, self.regs[10]));
                self.regs[10] = self.new_stack();
                return Ok(Next::At((pc as i64 + i.imm as i64) as usize));
            }
            return Ok(match self.helper(i.imm)? {
                Some(v) => {
                    self.regs[0] = v;
                    Next::At(pc)
                }
                None => Next::Exit(None),
            });
        }
        if !narrow && op == 0x90 {
            return Ok(match self.frames.pop() {
                Some((ret, saved, fp)) => {
                    self.regs[6..10].copy_from_slice(&saved);
                    self.regs[10] = fp;
                    Next::At(ret)
                }
                None => Next::Exit(Some(self.regs[0] as u32)),
            });
        }
        let b = if i.code & 8 != 0 {
            self.regs[i.src as usize]
        } else {
            i.imm as i64 as u64
        };
        let a = self.regs[i.dst];
        let (a, b, sa, sb) = if narrow {
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
        Ok(Next::At(if taken {
            (pc as i64 + i.off as i64) as usize
        } else {
            pc
        }))
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

/// The kernel's jiffies now, as `bpf_jiffies64` reads them: the `jiffies:` line of
/// `/proc/timer_list` (root only), the one place user space can read them.
fn jiffies() -> anyhow::Result<u64> {
    let list = std::fs::read_to_string("/proc/timer_list")?;
    list.lines()
        .find_map(|l| l.trim().strip_prefix("jiffies:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no jiffies line in /proc/timer_list"))
}

/// `clock`'s time in nanoseconds, as the BPF clock helpers read it.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
