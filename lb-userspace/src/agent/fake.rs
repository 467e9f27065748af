//! In-memory stand-ins for the kernel maps and the state file, with failures on demand, for
//! the reconciler's unit and property tests. They check the data plane's safety rules on
//! every write (a table never names an absent backend; an id never changes hands while a live
//! table names it), which the real maps cannot report.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use lb_common::FlowKey;

use crate::{
    Error,
    agent::{
        deny_file::{self, DenyChange, DenyList},
        kernel::Kernel,
        reconcile::{Capacity, KernelView, Op, apply_to_view},
        state::{StateFile, StateStore},
    },
};

/// Shared knobs and record of a [`FakeKernel`].
#[derive(Default)]
pub struct KernelCtl {
    /// Fail the write after this many more succeed.
    pub fail_after: Option<usize>,
    /// Writes done.
    pub writes: usize,
    /// Violations of the safety rules seen (must stay empty).
    pub violations: Vec<String>,
    /// What the maps hold.
    pub actual: KernelView,
}

pub struct FakeKernel {
    pub ctl: Arc<Mutex<KernelCtl>>,
    view: KernelView,
    cap: Capacity,
}

impl FakeKernel {
    pub fn new(cap: Capacity) -> (Self, Arc<Mutex<KernelCtl>>) {
        let ctl = Arc::new(Mutex::new(KernelCtl::default()));
        (
            FakeKernel {
                ctl: ctl.clone(),
                view: KernelView::default(),
                cap,
            },
            ctl,
        )
    }

    /// A kernel whose maps are `ctl`'s (an agent restarted over a previous one's kernel).
    pub fn over(ctl: Arc<Mutex<KernelCtl>>, cap: Capacity) -> Self {
        FakeKernel {
            ctl,
            view: KernelView::default(),
            cap,
        }
    }
}

fn check(actual: &KernelView, op: &Op) -> Option<String> {
    let named = |id: u32| {
        actual
            .published
            .iter()
            .any(|(vid, l)| actual.vips.values().any(|v| v == vid) && l.names(id))
    };
    match op {
        Op::SetBackend {
            id,
            new_owner: true,
            ..
        } if named(*id) => Some(format!(
            "backend id {id} changes hands while a live table names it"
        )),
        Op::ClearBackend { id } if named(*id) => Some(format!(
            "backend id {id} cleared while a live table names it"
        )),
        Op::PublishVip {
            table, previous, ..
        } => table
            .iter()
            .chain(previous.iter().flatten().filter(|id| **id != 0))
            .find(|id| !actual.backends.contains_key(id))
            .map(|id| format!("table names absent backend {id}")),
        _ => None,
    }
}

impl Kernel for FakeKernel {
    fn view(&self) -> &KernelView {
        &self.view
    }

    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        let mut ctl = self.ctl.lock().unwrap();
        if let Some(n) = ctl.fail_after.as_mut() {
            if *n == 0 {
                return Err(Error::Kernel("injected kernel failure".into()));
            }
            *n -= 1;
        }
        if let Some(v) = check(&ctl.actual, op) {
            ctl.violations.push(v);
        }
        apply_to_view(&mut ctl.actual, op);
        ctl.writes += 1;
        apply_to_view(&mut self.view, op);
        Ok(())
    }

    /// Edits the entries; fails like a write when a failure is due (the tries hold none).
    fn apply_source_delta(
        &mut self,
        sources: &mut Arc<crate::agent::guard::Sources>,
        add: &[(crate::agent::guard::SourceRule, u64)],
        remove: &[crate::agent::guard::SourceRule],
    ) -> Result<(), Error> {
        crate::agent::guard::edit_entries(Arc::make_mut(sources), add, remove);
        let mut ctl = self.ctl.lock().unwrap();
        match ctl.fail_after.as_mut() {
            Some(0) => Err(Error::Kernel("injected kernel failure".into())),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn resync(&mut self) -> Result<(), Error> {
        let ctl = self.ctl.lock().unwrap();
        // The maps cannot tell which table is live without reading M slots per VIP: like the
        // real kernel, forget that, so every VIP is published once more.
        self.view = KernelView {
            published: BTreeMap::new(),
            ..ctl.actual.clone()
        };
        Ok(())
    }

    fn capacity(&self) -> Capacity {
        self.cap
    }

    fn ring_size(&self) -> u32 {
        13
    }

    fn hash_seed(&self) -> u64 {
        7
    }

    fn flow_backend(&self, _key: &FlowKey, _vip_id: u32) -> Result<Option<u32>, Error> {
        Ok(None)
    }

    /// IPv4 only: the fake load balancer has no IPv6 address.
    fn outer_source(&self, backend: std::net::IpAddr) -> Option<std::net::IpAddr> {
        backend
            .is_ipv4()
            .then(|| std::net::IpAddr::from([192, 0, 2, 254]))
    }

    fn config(&self) -> lb_common::LbConfig {
        lb_common::LbConfig::DEFAULT
    }

    fn live_slots(&self, vip_id: u32) -> Result<Option<crate::agent::kernel::LiveSlots>, Error> {
        let ctl = self.ctl.lock().unwrap();
        Ok(ctl
            .actual
            .published
            .get(&vip_id)
            .filter(|l| !l.table.is_empty())
            .map(|l| (l.table.to_vec(), l.previous.to_vec())))
    }
}

/// A state file in memory.
#[derive(Default)]
pub struct StoreCtl {
    pub saved: StateFile,
    pub fail_next: bool,
    /// Fail the next save of the state file only (not the deny list's).
    pub fail_state: bool,
    /// The second-chance history file.
    pub history: Option<Vec<u8>>,
    /// Saves of the state file, and of the deny list, that succeeded.
    pub state_saves: usize,
    pub deny_saves: usize,
}

pub struct FakeStore(pub Arc<Mutex<StoreCtl>>);

impl StateStore for FakeStore {
    fn load(&self) -> Result<StateFile, Error> {
        Ok(self.0.lock().unwrap().saved.clone())
    }

    /// Like the file store, keeps the deny list apart: `state.desired.deny` is not read.
    fn save(&self, state: &StateFile) -> Result<(), Error> {
        let mut ctl = self.0.lock().unwrap();
        if std::mem::take(&mut ctl.fail_next) || std::mem::take(&mut ctl.fail_state) {
            return Err(Error::Io {
                what: "writing the state file".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        let deny = std::mem::take(&mut ctl.saved.desired.deny);
        ctl.saved = state.clone();
        ctl.saved.desired.deny = deny;
        ctl.state_saves += 1;
        Ok(())
    }

    /// Applies `changes` to the saved list, which must then be `full` (the agent's diff and
    /// its new list agree).
    fn save_deny<'a>(
        &self,
        changes: &[DenyChange],
        full: &dyn Fn() -> std::borrow::Cow<'a, DenyList>,
    ) -> Result<(), Error> {
        let mut ctl = self.0.lock().unwrap();
        if std::mem::take(&mut ctl.fail_next) {
            return Err(Error::Io {
                what: "appending to the deny journal".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        deny_file::apply(&mut ctl.saved.desired.deny, changes);
        assert_eq!(
            ctl.saved.desired.deny,
            *full(),
            "the deny changes miss the new list"
        );
        ctl.deny_saves += 1;
        Ok(())
    }

    fn load_history(&self) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.0.lock().unwrap().history.clone())
    }

    fn save_history(&self, bytes: &[u8]) -> Result<(), Error> {
        self.0.lock().unwrap().history = Some(bytes.to_vec());
        Ok(())
    }
}
