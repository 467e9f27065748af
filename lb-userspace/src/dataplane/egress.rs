//! What encapsulated forwarding needs besides the XDP program: the egress device map the
//! program redirects through (every interface the FIB may choose), and the tc egress program
//! that sends health probes through the tunnel (pinned like the XDP link, so it survives
//! restarts and upgrades and is replaced in one step).
use std::{collections::BTreeSet, path::Path};

use aya::{
    maps::{Map, MapData, xdp::DevMapHash},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use lb_common::{HC_PROGRAM, TX_PORTS_MAP};

use crate::{Dataplane, Error};

impl Dataplane {
    /// The health-check encapsulation program (tc egress).
    fn hc_program(&mut self) -> Result<&mut SchedClassifier, Error> {
        let name = HC_PROGRAM;
        self.ebpf_mut()
            .program_mut(name)
            .ok_or(Error::MissingProgram { name })?
            .try_into()
            .map_err(|source| Error::Program { name, source })
    }

    /// Attaches the health-check program to `iface`'s egress through a tcx link pinned at
    /// `link_pin`; an existing pin is updated to this program in place.
    pub fn attach_hc_pinned(&mut self, iface: &str, link_pin: &Path) -> Result<(), Error> {
        attach_tc_pinned(
            self.hc_program()?,
            HC_PROGRAM,
            iface,
            TcAttachType::Egress,
            link_pin,
        )
    }
}

/// Attaches `prog` (named `name`) to `iface` at `at` through a tcx link pinned at `link_pin`,
/// or updates the program of the link pinned there in one step.
pub fn attach_tc_pinned(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    at: TcAttachType,
    link_pin: &Path,
) -> Result<(), Error> {
    let pin_err =
        |what: &str, e: String| Error::Kernel(format!("{what} {}: {e}", link_pin.display()));
    let id = if link_pin.exists() {
        let pinned = PinnedLink::from_pin(link_pin)
            .map_err(|e| pin_err("opening the pinned link", e.to_string()))?;
        let fd_link: FdLink = pinned.into();
        let link = SchedClassifierLink::try_from(fd_link)
            .map_err(|e| pin_err("the pinned link", e.to_string()))?;
        prog.attach_to_link(link)
            .map_err(|source| Error::Program { name, source })?
    } else {
        prog.attach(iface, at).map_err(|source| Error::Attach {
            iface: iface.to_string(),
            mode: "tcx",
            hint: "",
            source: Box::new(source),
        })?
    };
    let link = prog
        .take_link(id)
        .map_err(|source| Error::Program { name, source })?;
    let fd_link = FdLink::try_from(link)
        .map_err(|e| pin_err("this kernel attached tc without a bpf_link", e.to_string()))?;
    if link_pin.exists() {
        // The pin holds the link; ours must not detach it when dropped.
        std::mem::forget(fd_link);
    } else {
        fd_link
            .pin(link_pin)
            .map_err(|e| pin_err("pinning the link at", e.to_string()))?;
    }
    Ok(())
}

/// The egress device map, opened from its pin: the program redirects to any interface the
/// FIB picks, so every interface but loopback is in it, kept current as links come and go.
pub struct TxPorts {
    map: DevMapHash<MapData>,
    present: BTreeSet<u32>,
}

impl TxPorts {
    pub fn open(map_dir: &Path) -> Result<Self, Error> {
        let path = map_dir.join(TX_PORTS_MAP);
        let data = MapData::from_pin(&path).map_err(|source| Error::Map {
            name: TX_PORTS_MAP,
            source,
        })?;
        let map = DevMapHash::try_from(Map::DevMapHash(data)).map_err(|source| Error::Map {
            name: TX_PORTS_MAP,
            source,
        })?;
        let present = map.keys().filter_map(Result::ok).collect();
        Ok(TxPorts { map, present })
    }

    /// Brings the map in line with the host's interfaces; returns how many entries changed.
    /// An interface whose driver refuses to be a redirect target is skipped (logged once per
    /// sync): the program drops what the FIB sends there, counted as `dropped_tx_error`.
    pub fn sync(&mut self) -> usize {
        let now = interfaces();
        let mut changed = 0;
        for gone in self.present.difference(&now).copied().collect::<Vec<_>>() {
            if self.map.remove(gone).is_ok() {
                self.present.remove(&gone);
                changed += 1;
            }
        }
        for new in now.difference(&self.present).copied().collect::<Vec<_>>() {
            match self.map.insert(new, new, None, 0) {
                Ok(()) => {
                    self.present.insert(new);
                    changed += 1;
                }
                Err(e) => log::debug!("interface {new} cannot be a redirect target: {e}"),
            }
        }
        changed
    }
}

/// Indexes of every interface but loopback.
fn interfaces() -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name);
            if name.to_bytes() != b"lo" {
                out.insert((*p).if_index);
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}
