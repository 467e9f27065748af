//! `BPF_MAP_UPDATE_BATCH` for the slot array (and `_DELETE_BATCH`, for the guard's tries): one syscall for thousands of slots (aya 0.14
//! has no batch operations): one syscall per slot made publishing a full slot table the
//! slowest step of a change.
use std::os::fd::{AsRawFd as _, BorrowedFd};

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Writes `values[i]` at key `keys[i]` of the map `fd` (whose key type is `K`, value type
/// `V`): an array's index, or any map's key the kernel batches (an LPM trie's).
pub fn update<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len());
    run(BPF_MAP_UPDATE_BATCH, fd, keys, Some(values))
}

/// Deletes `keys` from the map `fd` (`BPF_MAP_DELETE_BATCH`); a key not there is an error
/// (`ENOENT`).
pub fn delete<K: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> std::io::Result<()> {
    run::<K, u8>(BPF_MAP_DELETE_BATCH, fd, keys, None)
}

fn run<K, V>(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values.map_or(0, |v| v[done..].as_ptr() as u64),
            count: (keys.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points at live slices of `count` elements each; the kernel reads
        // `size_of::<BatchAttr>()` bytes of `attr` and writes back `count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if attr.count == 0 || err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
        done += attr.count as usize;
    }
    Ok(())
}
