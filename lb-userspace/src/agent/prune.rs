//! Ended `lb deny` entries taken out of the desired state, and so out of the kernel's trie
//! and the state file. The program already ignores an entry whose end has passed; pruning
//! frees its trie node, stops `VIP_F_NODE_DENY` sending every VIP's packets through the guard
//! once nothing is left, and keeps a list of short bans from growing for ever.
use crate::{
    Error,
    agent::{Agent, guard::unix_now_s},
    model::{DesiredState, Prefix},
};

/// The entries of the node's deny list that ended at or before `now` (Unix seconds).
pub fn ended_denies(state: &DesiredState, now: u64) -> Vec<Prefix> {
    state
        .deny
        .iter()
        .filter(|(_, end)| **end != 0 && **end <= now)
        .map(|(p, _)| *p)
        .collect()
}

impl Agent {
    /// Removes the deny entries that have ended, through the same path as every change (saved,
    /// then made live); how many. Nothing when none has: one look at the list under the lock.
    /// Blocking (it may write the state file): call it from a blocking thread.
    pub fn prune_denies(&self) -> Result<usize, Error> {
        let now = unix_now_s();
        if ended_denies(self.core().desired(), now).is_empty() {
            return Ok(0);
        }
        let mut pruned = 0;
        self.change(|d| {
            let gone = ended_denies(d, now);
            pruned = gone.len();
            let mut next = d.clone();
            for p in &gone {
                next.deny.remove(p);
            }
            Ok(next)
        })?;
        if pruned > 0 {
            self.record(format!("{pruned} ended deny entries removed"));
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_entries_with_an_end_that_passed() {
        let mut state = DesiredState::default();
        state.deny.insert("192.0.2.1/32".parse().unwrap(), 100);
        state.deny.insert("192.0.2.2/32".parse().unwrap(), 0);
        state.deny.insert("192.0.2.3/32".parse().unwrap(), 150);
        state.deny.insert("192.0.2.4/32".parse().unwrap(), 120);
        let gone = ended_denies(&state, 120);
        let want: Vec<Prefix> = ["192.0.2.1/32", "192.0.2.4/32"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(gone, want);
        assert!(ended_denies(&state, 99).is_empty());
    }
}
