//! The agent's recent changes and health flips, newest last, for the status page.
use std::collections::VecDeque;

use crate::protocol::Event;

/// How many events are kept.
pub const KEPT: usize = 50;

#[derive(Default)]
pub struct Events {
    ring: VecDeque<Event>,
}

impl Events {
    pub fn push(&mut self, at_unix: u64, what: String) {
        if self.ring.len() == KEPT {
            self.ring.pop_front();
        }
        self.ring.push_back(Event { at_unix, what });
    }

    pub fn list(&self) -> Vec<Event> {
        self.ring.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_in_order() {
        let mut e = Events::default();
        for i in 0..(KEPT as u64 + 7) {
            e.push(i, format!("e{i}"));
        }
        let l = e.list();
        assert_eq!(l.len(), KEPT);
        assert_eq!(l[0].what, "e7");
        assert_eq!(l[KEPT - 1].at_unix, KEPT as u64 + 6);
    }
}
