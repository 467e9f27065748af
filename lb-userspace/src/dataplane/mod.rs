//! Loading the eBPF object, attaching it, and owning its maps as typed tables.
//!
//! `mod.rs` holds the `Dataplane` (the loaded object and its tables) and what names it;
//! `options.rs` the load-time options, `load.rs` the load, `host.rs` capabilities and
//! interfaces, `attach.rs` the attachment.
mod attach;
pub mod batch;
pub mod egress;
pub mod guard;
mod host;
pub mod kernel;
mod load;
pub mod migrate;
pub mod nat;
mod options;
pub mod pins;
pub mod publish;
pub mod rawmap;
pub mod stats;
pub mod tables;

use aya::{
    Ebpf,
    maps::{MapData, xdp::DevMapHash},
    programs::Xdp,
};
use std::path::Path;

pub use self::attach::attach_xdp_pinned;
pub use self::host::{CAPABILITIES, if_index, require_capabilities};
pub use self::load::{attach_pass_alone, load_retrying};
pub use self::options::{LoadOptions, MAX_NAT_ENTRIES};
use self::{
    load::xdp_program,
    stats::StatsMaps,
    tables::{BackendTable, FlowTable, SlotTable, VipTable},
};
use crate::{Error, LB_PROGRAM, PASS_PROGRAM};

/// How to attach the program to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Driver (native) mode: fastest; the driver must support XDP.
    Native,
    /// Generic (skb) mode: works on any interface, slower.
    Generic,
    /// Native, falling back to generic when the driver refuses.
    Auto,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
            AttachMode::Auto => "auto",
        }
    }
}

/// The loaded eBPF object: its programs and its maps as typed tables.
pub struct Dataplane {
    ebpf: Ebpf,
    pub opts: LoadOptions,
    pub vips: VipTable,
    pub slots: SlotTable,
    pub backends: BackendTable,
    pub flows: FlowTable,
    pub tx_ports: DevMapHash<MapData>,
    pub stats: StatsMaps,
    pub nat: nat::NatTables,
    /// The NAT sweep's own handles: it runs without the agent's lock.
    pub nat_sweeper: std::sync::Arc<std::sync::Mutex<nat::NatSweeper>>,
    /// Packet capture's maps (`lb capture`): used without the agent's lock.
    pub capture: std::sync::Arc<crate::capture::Capturer>,
    /// The guard's source lists: shared, so a large list's entries are written before the
    /// agent's lock is taken for the change (`Kernel::guard_writer`).
    pub guard: std::sync::Arc<std::sync::Mutex<guard::GuardTables>>,
}

impl Dataplane {
    /// The guard's tries and limits, locked (a panic elsewhere leaves them usable: every
    /// write there is a whole batch call, and failures are read back).
    pub fn guard(&self) -> std::sync::MutexGuard<'_, guard::GuardTables> {
        self.guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The loaded object (for reading its programs' info, such as the verifier's figures).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The load-balancing program (for attaching or `BPF_PROG_TEST_RUN`).
    pub fn lb_program(&mut self) -> Result<&mut Xdp, Error> {
        xdp_program(&mut self.ebpf, LB_PROGRAM)
    }

    /// The trivial XDP_PASS program (for veth peers and benchmark floors).
    pub fn pass_program(&mut self) -> Result<&mut Xdp, Error> {
        xdp_program(&mut self.ebpf, PASS_PROGRAM)
    }

    /// Loads (once) and returns another XDP program of the object by name, such as the
    /// `bench_*` harnesses used by `cargo xtask bench`.
    pub fn extra_program(&mut self, name: &'static str) -> Result<&mut Xdp, Error> {
        let prog = xdp_program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            load_retrying(|| prog.load()).map_err(|source| Error::Program { name, source })?;
        }
        Ok(prog)
    }

    /// Attaches the load-balancing program to `iface` through a bpf_link pinned at
    /// `link_pin`, so it keeps forwarding when this process ends. If a link is pinned there
    /// already, the running program is replaced by this one in one step (nothing is dropped).
    /// Returns the mode of a new attachment, or `None` when an existing one was adopted.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        link_pin: &Path,
    ) -> Result<Option<AttachMode>, Error> {
        attach_xdp_pinned(self.lb_program()?, LB_PROGRAM, iface, mode, link_pin)
    }
}
