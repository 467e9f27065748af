//! A pinned map as bytes: the migration copies maps whose old types exist only as frozen
//! sizes (`lb_common::previous`), so aya's typed maps, which need the type at compile time,
//! do not fit. Element calls only (`BPF_MAP_*_ELEM`, `BPF_MAP_GET_NEXT_KEY`); aya 0.14 has no
//! untyped element access.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::maps::{MapData, MapType};

/// The element members of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value`, or `next_key` for `BPF_MAP_GET_NEXT_KEY`.
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// Update flags.
pub const BPF_ANY: u64 = 0;
pub const BPF_NOEXIST: u64 = 1;

/// A map opened from its pin, with its shape.
pub struct RawMap {
    data: MapData,
    pub map_type: Option<MapType>,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    /// Bytes of one value as the syscalls see it: one 8-byte-aligned slot per possible CPU
    /// for per-CPU maps.
    pub value_len: usize,
}

impl RawMap {
    pub fn open(path: &Path) -> io::Result<RawMap> {
        let data = MapData::from_pin(path).map_err(io::Error::other)?;
        let info = data.info().map_err(io::Error::other)?;
        let map_type = info.map_type().ok();
        let per_cpu = matches!(
            map_type,
            Some(MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash)
        );
        let value_len = if per_cpu {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
            (info.value_size() as usize).div_ceil(8) * 8 * cpus
        } else {
            info.value_size() as usize
        };
        Ok(RawMap {
            map_type,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
            value_len,
            data,
        })
    }

    /// Whether its keys are the indices `0..max_entries` (every index holds a value).
    pub fn is_array(&self) -> bool {
        matches!(
            self.map_type,
            Some(MapType::Array | MapType::PerCpuArray | MapType::ProgramArray)
        )
    }

    fn call(
        &self,
        cmd: libc::c_long,
        key: *const u8,
        value: *mut u8,
        flags: u64,
    ) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: self.data.fd().as_fd().as_raw_fd() as u32,
            key: key as u64,
            value: value as u64,
            flags,
            ..Default::default()
        };
        // SAFETY: `key` and `value` point at buffers of the map's key and value length (the
        // callers size them from the map's own info); the kernel reads `attr` only.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &mut attr as *mut ElemAttr,
                std::mem::size_of::<ElemAttr>() as u32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The value under `key`, if any.
    pub fn lookup(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        assert_eq!(key.len(), self.key_size as usize);
        let mut value = vec![0u8; self.value_len];
        match self.call(BPF_MAP_LOOKUP_ELEM, key.as_ptr(), value.as_mut_ptr(), 0) {
            Ok(()) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `value` under `key` (`BPF_ANY` or `BPF_NOEXIST`); `false` when `BPF_NOEXIST`
    /// met an entry already there.
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> io::Result<bool> {
        assert_eq!(key.len(), self.key_size as usize);
        assert_eq!(value.len(), self.value_len);
        match self.call(
            BPF_MAP_UPDATE_ELEM,
            key.as_ptr(),
            value.as_ptr() as *mut u8,
            flags,
        ) {
            Ok(()) => Ok(true),
            Err(e) if flags == BPF_NOEXIST && e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every key: the indices of an array, or a walk of a hash map. A walk over a map the
    /// program changes meanwhile may restart (a deleted key sends it back to the first), so
    /// it stops after twice the capacity and keeps each key once.
    pub fn keys(&self) -> io::Result<Vec<Vec<u8>>> {
        if self.is_array() {
            return Ok((0..self.max_entries)
                .map(|i| i.to_ne_bytes().to_vec())
                .collect());
        }
        let mut seen = std::collections::HashSet::new();
        let mut keys = Vec::new();
        let mut next = vec![0u8; self.key_size as usize];
        let mut first = true;
        let limit = 2 * u64::from(self.max_entries) + 16;
        for _ in 0..limit {
            let prev = next.clone();
            let key_ptr = if first {
                std::ptr::null()
            } else {
                prev.as_ptr()
            };
            match self.call(BPF_MAP_GET_NEXT_KEY, key_ptr, next.as_mut_ptr(), 0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e) => return Err(e),
            }
            first = false;
            if seen.insert(next.clone()) {
                keys.push(next.clone());
            }
        }
        Ok(keys)
    }
}

/// A second handle on `data`'s kernel map (a duplicated fd), for a reader that keeps its own
/// copy outside the agent's lock (the sweep, the counters, the top sources).
pub fn dup(data: &MapData, name: &'static str) -> Result<MapData, crate::Error> {
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(crate::Error::io(format!("duplicating the fd of {name}")))?;
    MapData::from_fd(fd).map_err(|source| crate::Error::Map { name, source })
}
