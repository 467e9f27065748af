//! Attaching XDP programs, directly or through a pinned bpf_link (so the attachment outlives
//! the process and a later run replaces the program in one step).
use std::path::Path;

use aya::programs::{
    Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpLinkId},
};

use super::{AttachMode, if_index};
use crate::Error;

/// Attaches `prog` to `iface` in `mode` (auto: native, then generic).
fn attach_xdp(
    prog: &mut Xdp,
    iface: &str,
    mode: AttachMode,
) -> Result<(AttachMode, XdpLinkId), Error> {
    if if_index(iface).is_none() {
        return Err(Error::NoSuchInterface(iface.to_string()));
    }
    let try_mode = |prog: &mut Xdp, m: AttachMode| {
        let xm = if m == AttachMode::Generic {
            XdpMode::Skb
        } else {
            XdpMode::Driver
        };
        prog.attach(iface, xm)
            .map(|id| (m, id))
            .map_err(|source| Error::Attach {
                iface: iface.to_string(),
                mode: m.as_str(),
                hint: if m == AttachMode::Generic {
                    ""
                } else {
                    "; try `--mode generic`"
                },
                source: Box::new(source),
            })
    };
    match mode {
        AttachMode::Auto => {
            try_mode(prog, AttachMode::Native).or_else(|_| try_mode(prog, AttachMode::Generic))
        }
        m => try_mode(prog, m),
    }
}

/// Attaches `prog` (named `name`) to `iface` through a bpf_link pinned at `link_pin`, or, if
/// a link is pinned there already, replaces the program it runs in one step. Returns the mode
/// of a new attachment, or `None` when an existing one was adopted.
pub fn attach_xdp_pinned(
    prog: &mut Xdp,
    name: &'static str,
    iface: &str,
    mode: AttachMode,
    link_pin: &Path,
) -> Result<Option<AttachMode>, Error> {
    let pin_err =
        |what: &str, e: String| Error::Kernel(format!("{what} {}: {e}", link_pin.display()));
    if link_pin.exists() {
        let pinned = PinnedLink::from_pin(link_pin)
            .map_err(|e| pin_err("opening the pinned link", e.to_string()))?;
        let fd_link: FdLink = pinned.into();
        let xdp_link =
            XdpLink::try_from(fd_link).map_err(|e| pin_err("the pinned link", e.to_string()))?;
        let id = prog
            .attach_to_link(xdp_link)
            .map_err(|source| Error::Program { name, source })?;
        // Keep the link open: the pin still holds it, and dropping ours must not detach.
        let link = prog
            .take_link(id)
            .map_err(|source| Error::Program { name, source })?;
        std::mem::forget(link);
        return Ok(None);
    }
    let (used, id) = attach_xdp(prog, iface, mode)?;
    let link = prog
        .take_link(id)
        .map_err(|source| Error::Program { name, source })?;
    let fd_link = FdLink::try_from(link).map_err(|e| {
        pin_err(
            "this kernel attached XDP without a bpf_link, cannot pin",
            e.to_string(),
        )
    })?;
    if let Some(dir) = link_pin.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
    }
    let pinned = fd_link
        .pin(link_pin)
        .map_err(|e| pin_err("pinning the link at", e.to_string()))?;
    // The pin keeps the attachment; our fd closes with `pinned`.
    drop(pinned);
    Ok(Some(used))
}
