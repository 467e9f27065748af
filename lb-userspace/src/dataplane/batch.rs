//! `BPF_MAP_UPDATE_BATCH` for the slot array: one syscall for thousands of slots (aya 0.14
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

/// Writes `values[i]` at index `keys[i]` of the array map `fd` (whose value type is `V`).
pub fn update<V: aya::Pod>(fd: BorrowedFd<'_>, keys: &[u32], values: &[V]) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points at live slices of `count` elements each; the kernel reads
        // `size_of::<BatchAttr>()` bytes of `attr` and writes back `count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
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
