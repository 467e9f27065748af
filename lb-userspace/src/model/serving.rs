//! The one rule for who serves: whether a backend takes new flows, and if not why. The
//! reconciler applies it with this node's health and MACs; the plan with none (it shows
//! configured shares), so both agree on everything the configuration decides.
use serde::{Deserialize, Serialize};

use super::BackendSpec;

/// Why a backend of a VIP takes no new flows (or `Serving`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Serving {
    Serving,
    /// Weight 0.
    Weightless,
    Drained,
    /// Failed its health check.
    Down,
    /// Its MAC is unknown (the neighbour table has no entry for it).
    NoMac,
}

impl Serving {
    /// Whether and why `backend` takes new flows, given whether its MAC is known (always for
    /// routed VIPs: the FIB finds the next hop) and whether it passes its health check.
    /// The configuration decides first (weight, drain), then the MAC, then health.
    pub fn of(
        backend: &BackendSpec,
        mac_known: impl FnOnce() -> bool,
        up: impl FnOnce() -> bool,
    ) -> Serving {
        if backend.weight == 0 {
            Serving::Weightless
        } else if backend.drained {
            Serving::Drained
        } else if !mac_known() {
            Serving::NoMac
        } else if !up() {
            Serving::Down
        } else {
            Serving::Serving
        }
    }

    /// What the configuration alone says (MAC known, health passing): the plan's rule.
    pub fn configured(backend: &BackendSpec) -> Serving {
        Serving::of(backend, || true, || true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(weight: u32, drained: bool) -> BackendSpec {
        BackendSpec {
            weight,
            mac: None,
            drained,
        }
    }

    #[test]
    fn configuration_decides_before_mac_and_health() {
        assert_eq!(Serving::configured(&spec(1, false)), Serving::Serving);
        assert_eq!(Serving::configured(&spec(0, true)), Serving::Weightless);
        assert_eq!(Serving::configured(&spec(1, true)), Serving::Drained);
        assert_eq!(
            Serving::of(&spec(1, false), || false, || false),
            Serving::NoMac
        );
        assert_eq!(
            Serving::of(&spec(1, false), || true, || false),
            Serving::Down
        );
    }
}
