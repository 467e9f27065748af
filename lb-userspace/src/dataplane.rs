//! Loading and attaching the XDP program.
use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode},
};

use crate::{EBPF_OBJECT, Error, LB_PROGRAM, stats::StatsMap};

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

/// The loaded eBPF object: programs and maps.
pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the embedded object into the kernel (the verifier runs here).
    pub fn load() -> Result<Self, Error> {
        require_root()?;
        let ebpf = EbpfLoader::new().load(EBPF_OBJECT).map_err(Error::Load)?;
        let mut dp = Dataplane { ebpf };
        dp.lb_program()?.load().map_err(|source| Error::Program {
            name: LB_PROGRAM,
            source,
        })?;
        Ok(dp)
    }

    fn lb_program(&mut self) -> Result<&mut Xdp, Error> {
        self.ebpf
            .program_mut(LB_PROGRAM)
            .ok_or(Error::MissingProgram { name: LB_PROGRAM })?
            .try_into()
            .map_err(|source| Error::Program {
                name: LB_PROGRAM,
                source,
            })
    }

    /// Attaches the load-balancing program to `iface`; returns the mode actually used.
    /// The program stays attached until this `Dataplane` is dropped.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachMode, Error> {
        if nix_if_index(iface).is_none() {
            return Err(Error::NoSuchInterface(iface.to_string()));
        }
        let prog = self.lb_program()?;
        let try_mode = |prog: &mut Xdp, m: AttachMode| {
            let xm = if m == AttachMode::Generic {
                XdpMode::Skb
            } else {
                XdpMode::Driver
            };
            prog.attach(iface, xm)
                .map(|_| m)
                .map_err(|source| Error::Attach {
                    iface: iface.to_string(),
                    mode: m.as_str(),
                    source,
                })
        };
        match mode {
            AttachMode::Auto => {
                try_mode(prog, AttachMode::Native).or_else(|_| try_mode(prog, AttachMode::Generic))
            }
            m => try_mode(prog, m),
        }
    }

    /// Typed access to the global counters.
    pub fn stats(&self) -> Result<StatsMap<'_>, Error> {
        StatsMap::new(
            self.ebpf
                .map(lb_common::STATS_MAP)
                .ok_or(Error::MissingMap {
                    name: lb_common::STATS_MAP,
                })?,
        )
    }
}

/// The interface index of `iface`, if it exists.
pub fn nix_if_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (idx != 0).then_some(idx)
}

fn require_root() -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    Ok(())
}
