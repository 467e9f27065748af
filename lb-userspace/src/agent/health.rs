//! Health thresholds, pure: a backend flips down after `fall` consecutive failed probes and up
//! after `rise` consecutive passed ones (pingora's `observe_health(ok) -> flipped`).
use serde::{Deserialize, Serialize};

use crate::model::HealthCheck;

/// Health of one backend under one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub up: bool,
    /// Result of the last probe (`ok`, or what failed).
    pub last: String,
    /// Consecutive probes that disagree with `up`.
    pub streak: u32,
    /// The check these results were gathered under; a changed check starts afresh.
    pub check: HealthCheck,
}

impl Health {
    /// A backend starts up (as HAProxy does) until `fall` probes fail.
    pub fn new(check: HealthCheck) -> Self {
        Health {
            up: true,
            last: "not checked yet".into(),
            streak: 0,
            check,
        }
    }

    /// Records one probe; true when the backend changed state.
    pub fn observe(&mut self, ok: bool, detail: String) -> bool {
        self.last = detail;
        if ok == self.up {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if ok { self.check.rise } else { self.check.fall };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            true
        } else {
            false
        }
    }
}

/// A TCP check with `rise` and `fall`, for unit tests.
#[cfg(test)]
pub(crate) fn test_check(rise: u32, fall: u32) -> HealthCheck {
    HealthCheck {
        kind: crate::model::HealthKind::Tcp,
        port: None,
        path: "/".into(),
        expect_status: 200,
        interval_ms: 100,
        timeout_ms: 50,
        rise,
        fall,
    }
}

#[cfg(test)]
mod tests {
    use super::{test_check as check, *};

    #[test]
    fn flips_after_fall_failures_and_rise_successes() {
        let mut h = Health::new(check(2, 3));
        assert!(!h.observe(false, "x".into()));
        assert!(!h.observe(false, "x".into()));
        assert!(h.observe(false, "x".into()));
        assert!(!h.up);
        assert!(!h.observe(false, "x".into()));
        assert!(!h.observe(true, "ok".into()));
        assert!(h.observe(true, "ok".into()));
        assert!(h.up);
    }

    #[test]
    fn a_pass_between_failures_resets_the_streak() {
        let mut h = Health::new(check(1, 2));
        assert!(!h.observe(false, "x".into()));
        assert!(!h.observe(true, "ok".into()));
        assert!(!h.observe(false, "x".into()));
        assert!(h.up);
        assert!(h.observe(false, "x".into()));
        assert_eq!(h.last, "x");
    }
}
