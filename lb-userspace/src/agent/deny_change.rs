//! `lb deny add|remove` on a path of its own: the change is worked out as a delta against
//! the node's list (`ops::deny_delta`), appended to the deny journal, then applied in place
//! to the core's list and entries and written to the tries exactly. A list of a million
//! prefixes is neither copied, laid out again nor walked, so one prefix added or removed is
//! live as fast with a million in place as with none.
use std::{borrow::Cow, sync::PoisonError};

use super::{Agent, Changed, Core, deny_file, guard, ops};
use crate::{Error, protocol::Command};

/// The most prefixes a deny command may name to take the delta path. Its work (the edits of
/// the list and entries, the trie writes) runs under the core's lock, which a change of a
/// few prefixes holds briefly; a bulk load (`lb deny add --file`) takes the ordinary path,
/// which lays out and writes its entries before taking the lock, so readers go on.
const DELTA_MAX: usize = 4096;

impl Agent {
    /// Applies `lb deny add|remove` `cmd`. Blocking (it appends to the journal): call it
    /// from a blocking thread. A failed save changes nothing; a failed kernel write leaves
    /// the change saved and in memory, reported as [`Error::NotConverged`] and retried by
    /// [`Agent::retry`], as for every other change.
    pub(super) fn change_deny(&self, cmd: &Command) -> Result<Changed, Error> {
        let named = match cmd {
            Command::DenyAdd { prefixes, .. } | Command::DenyRemove { prefixes } => prefixes.len(),
            _ => 0,
        };
        if named > DELTA_MAX {
            return self.change_at(None, false, |d| {
                ops::edit(d, cmd).map(|n| n.unwrap_or_else(|| d.clone()))
            });
        }
        // The writer's lock keeps the list the delta is worked out against until it is live.
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let changes = ops::deny_delta(&self.core().desired().deny, cmd)?;
        if changes.is_empty() {
            return Ok(Changed::default());
        }
        // The whole list is made only when the journal is folded into a new snapshot.
        let full = || {
            let mut list = self.core().desired().deny.clone();
            deny_file::apply(&mut list, &changes);
            Cow::Owned(list)
        };
        self.store.save_deny(&changes, &full)?;
        self.core().apply_deny(&changes)?;
        Ok(Changed::default())
    }
}

impl Core {
    /// Makes saved deny list `changes` live: the list and the guard's entries edited in
    /// place, the tries given exactly the change, then a convergence for the VIPs' flags
    /// (the node's flag goes on once the list has entries: entries before flags). A list
    /// emptied by the change has its flags taken off before its entries are deleted, by the
    /// ordinary convergence (the whole list is the change then).
    pub fn apply_deny(&mut self, changes: &[deny_file::DenyChange]) -> Result<(), Error> {
        let was_empty = self.desired.deny.is_empty();
        deny_file::apply(&mut self.desired.deny, changes);
        let written = if !was_empty && self.desired.deny.is_empty() {
            self.sources = std::sync::Arc::new(guard::sources(&self.desired, &self.ids));
            Ok(())
        } else {
            let (add, remove) = guard::node_delta(changes);
            self.kernel
                .apply_source_delta(&mut self.sources, &add, &remove)
        };
        if let Err(e) = written {
            let msg = e.to_string();
            self.not_converged = Some(msg.clone());
            return Err(Error::NotConverged(msg));
        }
        self.converge()
    }
}
