//! The pinned map set of one interface: where it lives, whether this agent may adopt it, and
//! the lock that keeps a second agent from touching it.
//!
//! Adoption is checked before anything is loaded or changed: every pinned map's type, key and
//! value sizes, flags and capacity against what these options would create, and the pinned
//! [`AbiRecord`] (build layout and load options) against this agent's. A mismatch is refused
//! with one line saying what differs; `--fresh` discards the old set.
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::maps::{Array, MapData, MapInfo, MapType};
use lb_common::{
    ABI_MAGIC, ABI_MAP, ABI_VERSION, AbiRecord, BPF_F_NO_COMMON_LRU, LB_MAPS, MapKind, MapSpec,
    abi_layout, migrate::MIGRATES_FROM,
};

use crate::{Error, LoadOptions};

/// Where this interface's pins live.
pub fn pin_dir(bpffs: &Path, iface: &str) -> PathBuf {
    bpffs.join("xdp-lb").join(iface)
}

/// Removes the link pin (detaching the program once nothing else holds it) and every map pin.
/// The health-check program's tc link, beside the XDP `link`.
pub const HC_LINK: &str = "hc-link";

pub fn remove_pins(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("link"));
    let _ = std::fs::remove_file(dir.join(HC_LINK));
    if let Ok(entries) = std::fs::read_dir(dir.join("maps")) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir.join("maps"));
    super::migrate::clear_staged(&dir.join("maps"));
    let _ = std::fs::remove_dir(dir);
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

/// The record these options give.
pub fn abi_record(opts: &LoadOptions) -> AbiRecord {
    AbiRecord {
        magic: ABI_MAGIC,
        version: ABI_VERSION,
        flow_table: opts.config().flow_table,
        layout: abi_layout(),
        ring_size: opts.ring_size,
        max_vips: opts.max_vips,
        max_backends: opts.max_backends,
        flow_entries: opts.flow_entries,
        hash_seed: opts.hash_seed,
        nat_entries: opts.nat_entries,
        ..AbiRecord::default()
    }
}

/// The kernel's map type of `kind`.
pub(crate) fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::Array => MapType::Array,
        MapKind::ProgArray => MapType::ProgramArray,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::LruHash => MapType::LruHash,
        MapKind::LpmTrie => MapType::LpmTrie,
        MapKind::DevMapHash => MapType::DevMapHash,
        MapKind::RingBuf => MapType::RingBuf,
    }
}

/// What each pinned map must look like under `opts`: its description (`lb_common::LB_MAPS`)
/// and its number of entries.
fn expected(opts: &LoadOptions) -> Result<Vec<(&'static MapSpec, u32)>, Error> {
    // The kernel rounds an LRU with per-CPU lists up to a multiple of the possible CPUs.
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1) as u32);
    LB_MAPS
        .iter()
        .filter(|m| m.pinned)
        .map(|m| {
            let mut entries = opts.capacity(m.capacity)?;
            if m.flags & BPF_F_NO_COMMON_LRU != 0 {
                entries = entries.div_ceil(cpus) * cpus;
            }
            Ok((m, entries))
        })
        .collect()
}

/// Whether `map_dir` holds a map set to adopt.
pub enum Pins {
    /// Nothing pinned: the maps will be created.
    Fresh,
    /// A compatible set is pinned and will be adopted.
    Adopt,
    /// A set of the previous ABI is pinned and will be migrated as planned.
    Migrate(Box<super::migrate::Plan>),
}

fn incompatible(map_dir: &Path, what: String) -> Error {
    Error::Conflict(format!(
        "the maps pinned under {} do not match this agent ({what}): start with the options they were made with, or with --fresh to discard the old state (its flows are lost)",
        map_dir.display()
    ))
}

/// Compares the pinned set under `map_dir` with what `opts` would create; changes nothing.
/// A set of the previous ABI made with the same options is planned for migration.
pub fn check(map_dir: &Path, opts: &LoadOptions) -> Result<Pins, Error> {
    let present = std::fs::read_dir(map_dir)
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    if present == 0 {
        return Ok(Pins::Fresh);
    }
    let record = read_record(map_dir)?;
    let want = abi_record(opts);
    if record.magic != ABI_MAGIC {
        return Err(incompatible(
            map_dir,
            format!("{ABI_MAP} holds no record: made by another build"),
        ));
    }
    if record.version != want.version {
        check_version(map_dir, &record)?;
    } else if record.layout != want.layout {
        return Err(incompatible(
            map_dir,
            format!(
                "made by a build with map ABI version {} / layout {:#x}, this is {} / {:#x}",
                record.version, record.layout, want.version, want.layout
            ),
        ));
    }
    let diffs = option_differences(&record, &want);
    if !diffs.is_empty() {
        return Err(incompatible(
            map_dir,
            format!("pinned with {}", diffs.join(", ")),
        ));
    }
    if record.version == MIGRATES_FROM {
        return super::migrate::plan(map_dir, opts).map(|p| Pins::Migrate(Box::new(p)));
    }
    check_maps(map_dir, opts)?;
    Ok(Pins::Adopt)
}

/// A record of another ABI: the previous one (with its own layout) is migrated, any other
/// refused with what to do.
fn check_version(map_dir: &Path, record: &AbiRecord) -> Result<(), Error> {
    let (have, dir) = (record.version, map_dir.display());
    let what = if have == MIGRATES_FROM {
        if record.layout == lb_common::previous::LAYOUT {
            return Ok(());
        }
        format!(
            "made by a build with map ABI {have} but layout {:#x}, not the release's {:#x}: this build migrates only what the ABI {have} release made",
            record.layout,
            lb_common::previous::LAYOUT
        )
    } else if have < MIGRATES_FROM {
        format!(
            "made by map ABI {have}; this build (ABI {ABI_VERSION}) migrates only from ABI {MIGRATES_FROM}: upgrade through a release of ABI {MIGRATES_FROM} first"
        )
    } else {
        format!(
            "made by map ABI {have}, newer than this build's {ABI_VERSION}: a downgrade is not migrated, run a build of ABI {have}"
        )
    };
    Err(Error::Conflict(format!(
        "the maps pinned under {dir} cannot be adopted ({what}), or start with --fresh to discard the old state (its flows are lost)"
    )))
}

/// The pinned set's ABI record: every ABI's record starts with the fields of ABI 13's, so a
/// shorter (older) one is read into them and the rest left zero.
pub fn read_record(map_dir: &Path) -> Result<AbiRecord, Error> {
    let unreadable = || {
        incompatible(
            map_dir,
            format!("no readable {ABI_MAP} record: made by another build"),
        )
    };
    let map = super::rawmap::RawMap::open(&map_dir.join(ABI_MAP)).map_err(|_| unreadable())?;
    let bytes = map
        .lookup(&0u32.to_ne_bytes())
        .ok()
        .flatten()
        .ok_or_else(unreadable)?;
    let mut out = [0u8; size_of::<AbiRecord>()];
    let n = bytes.len().min(out.len());
    // The fields every ABI's record since 13 starts with (up to `hash_seed`): enough to tell
    // a set this build migrates from one it refuses with what to do.
    if n < std::mem::offset_of!(AbiRecord, nat_entries) {
        return Err(unreadable());
    }
    out[..n].copy_from_slice(&bytes[..n]);
    // SAFETY: `AbiRecord` is plain integers (repr(C)); every byte pattern is a value.
    let record = unsafe { std::ptr::read_unaligned(out.as_ptr().cast::<AbiRecord>()) };
    Ok(record)
}

/// The options the pinned set was made with that differ from this agent's, by flag.
fn option_differences(record: &AbiRecord, want: &AbiRecord) -> Vec<String> {
    let pairs: [(&str, u64, u64); 7] = [
        (
            "--ring-size",
            record.ring_size.into(),
            want.ring_size.into(),
        ),
        ("--max-vips", record.max_vips.into(), want.max_vips.into()),
        (
            "--max-backends",
            record.max_backends.into(),
            want.max_backends.into(),
        ),
        (
            "--flow-entries",
            record.flow_entries.into(),
            want.flow_entries.into(),
        ),
        (
            "--per-cpu-flows",
            record.flow_table.into(),
            want.flow_table.into(),
        ),
        ("--hash-seed", record.hash_seed, want.hash_seed),
        (
            "--nat-entries",
            record.nat_entries.into(),
            want.nat_entries.into(),
        ),
    ];
    pairs
        .into_iter()
        .filter(|(_, have, want)| have != want)
        .map(|(what, have, want)| format!("{what} {have}, this agent {want}"))
        .collect()
}

/// Every pinned map has the kind, sizes, capacity and flags this agent would create.
fn check_maps(map_dir: &Path, opts: &LoadOptions) -> Result<(), Error> {
    for (m, entries) in expected(opts)? {
        let (name, ty, flags) = (m.name, map_type(m.kind), m.flags & BPF_F_NO_COMMON_LRU);
        let (key, value) = (m.key_size, m.value_size);
        let info = MapInfo::from_pin(map_dir.join(name))
            .map_err(|e| incompatible(map_dir, format!("map {name} is not readable: {e}")))?;
        let have_ty = info.map_type().ok();
        if have_ty != Some(ty)
            || info.key_size() != key
            || info.value_size() != value
            || info.max_entries() != entries
            || info.map_flags() & BPF_F_NO_COMMON_LRU != flags
        {
            return Err(incompatible(
                map_dir,
                format!(
                    "map {name} is {have_ty:?} key {} value {} entries {} flags {:#x}, this agent needs {ty:?} key {key} value {value} entries {entries} flags {flags:#x}",
                    info.key_size(),
                    info.value_size(),
                    info.max_entries(),
                    info.map_flags()
                ),
            ));
        }
    }
    Ok(())
}

/// Creates the record `record` and pins it as the set's record, in place of any old one in
/// one step (pinned in the staging directory, then renamed over it).
pub fn write_record(map_dir: &Path, record: &AbiRecord) -> Result<(), Error> {
    let mut a = Array::<MapData, AbiRecord>::create(1, 0).map_err(|source| Error::Map {
        name: ABI_MAP,
        source,
    })?;
    a.set(0, record, 0).map_err(|source| Error::Map {
        name: ABI_MAP,
        source,
    })?;
    let staged = super::migrate::staged_dir(map_dir);
    std::fs::create_dir_all(&staged)
        .map_err(Error::io(format!("creating {}", staged.display())))?;
    let tmp = staged.join(ABI_MAP);
    let _ = std::fs::remove_file(&tmp);
    a.pin(&tmp)
        .map_err(|e| Error::Kernel(format!("pinning {}: {e}", tmp.display())))?;
    let path = map_dir.join(ABI_MAP);
    std::fs::rename(&tmp, &path).map_err(Error::io(format!("pinning {}", path.display())))?;
    // Left only when a migration still stages maps there.
    let _ = std::fs::remove_dir(&staged);
    Ok(())
}

/// The lock of the pins in `pin_dir`: a directory beside it (`<iface>:lock`), on the same
/// bpffs (which refuses names with a dot; no interface name can hold a colon, so this never
/// meets another interface's pins). The lock lives with what it protects: whoever can see the pins sees the lock, it
/// needs no other writable directory (the agent may run without a root uid, owning only its
/// bpffs directory), and it goes away with the bpffs mount.
pub fn lock_dir(pin_dir: &Path) -> PathBuf {
    let mut name = pin_dir.file_name().unwrap_or_default().to_os_string();
    name.push(":lock");
    pin_dir.with_file_name(name)
}

/// The symlink in the lock directory that names the holder (bpffs holds no regular files,
/// but symlinks; the target is free text).
const HOLDER: &str = "holder";

/// An exclusive lock on one interface's pins, held for the agent's life (`flock` on the lock
/// directory: released by the kernel when the process dies, also on kill -9).
pub struct AgentLock {
    /// Open for the flock only.
    _dir: File,
    path: PathBuf,
}

impl AgentLock {
    /// Takes the lock of the pins under `pin_dir`, or says who holds it. Touches no pin.
    pub fn acquire(pin_dir: &Path, iface: &str, socket: &Path) -> Result<AgentLock, Error> {
        let path = lock_dir(pin_dir);
        // A releasing agent removes the directory after unlocking it; if that happens between
        // our open and our flock, we hold a lock on a removed directory: look again.
        for _ in 0..3 {
            std::fs::create_dir_all(&path)
                .map_err(Error::io(format!("creating {}", path.display())))?;
            let dir =
                File::open(&path).map_err(Error::io(format!("opening {}", path.display())))?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let holder = std::fs::read_link(path.join(HOLDER))
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "holder unknown".to_string());
                return Err(Error::Conflict(format!(
                    "another agent already runs on {iface} ({holder}): stop it first; nothing was changed"
                )));
            }
            if !same_inode(&dir, &path) {
                continue;
            }
            let me = format!("pid {}, socket {}", std::process::id(), socket.display());
            let link = path.join(HOLDER);
            let _ = std::fs::remove_file(&link);
            let _ = std::os::unix::fs::symlink(&me, &link);
            return Ok(AgentLock { _dir: dir, path });
        }
        Err(Error::Conflict(format!(
            "the lock {} keeps being removed under us: another agent is starting and stopping on {iface}",
            path.display()
        )))
    }

    /// Removes the lock directory and releases the lock (clean exit, or a refused start).
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for AgentLock {
    /// A process killed with -9 leaves the directory; the kernel releases its lock, and the
    /// next agent reuses it. The fd is closed after the removal (field drop order).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path.join(HOLDER));
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Whether `path` still names the directory open as `file`.
fn same_inode(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at `dir` unless one is there already.
pub fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("bad path {}", dir.display())))?;
    // SAFETY: statfs into a zeroed struct with a valid C path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let bpf = c"bpf";
    // SAFETY: valid C strings; no data argument.
    if unsafe { libc::mount(bpf.as_ptr(), c.as_ptr(), bpf.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(Error::io(format!("mounting bpffs at {}", dir.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use lb_common::{ABI_VERSION, AbiRecord, migrate::MIGRATES_FROM, previous};

    fn record(version: u32, layout: u64) -> AbiRecord {
        AbiRecord {
            version,
            layout,
            ..AbiRecord::default()
        }
    }

    #[test]
    fn only_the_previous_release_is_migrated() {
        let dir = std::path::Path::new("/sys/fs/bpf/xdp-lb/eth0/maps");
        let check = |v, l| super::check_version(dir, &record(v, l)).map_err(|e| e.to_string());
        assert!(check(MIGRATES_FROM, previous::LAYOUT).is_ok());
        let older = check(MIGRATES_FROM - 1, 0).expect_err("older refused");
        assert_eq!(
            older,
            format!(
                "the maps pinned under {} cannot be adopted (made by map ABI {}; this build (ABI {ABI_VERSION}) migrates only from ABI {MIGRATES_FROM}: upgrade through a release of ABI {MIGRATES_FROM} first), or start with --fresh to discard the old state (its flows are lost)",
                dir.display(),
                MIGRATES_FROM - 1
            )
        );
        let newer = check(ABI_VERSION + 1, 0).expect_err("newer refused");
        assert!(newer.contains("a downgrade is not migrated"), "{newer}");
        let other = check(MIGRATES_FROM, previous::LAYOUT ^ 1).expect_err("unknown layout");
        assert!(other.contains("migrates only what the ABI"), "{other}");
    }
}
