//! What the agent asks of the host before touching the kernel: its capabilities and an
//! interface's index. Apart from loading because `lb run`, `lb decap` and the tests ask too.
use crate::Error;

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
