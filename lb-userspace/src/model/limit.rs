//! New-flow limits (`RATE` or `RATE/BURST`), per VIP or per source: parsed, printed, checked.
use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use super::VipAddr;

/// A new-flow limit: `rate` flows per second, and up to `burst` at once after a quiet spell
/// (a token bucket). Written `RATE` or `RATE/BURST` on the command line; the burst defaults
/// to the rate (a second's worth).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowLimit {
    pub rate: u32,
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Highest new-flow rate and burst accepted.
pub const MAX_FLOW_RATE: u32 = 100_000_000;

impl FlowLimit {
    /// The burst in effect.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.rate)
    }

    pub fn validate(&self, vip: &VipAddr, what: &str) -> Result<(), String> {
        if self.rate == 0
            || self.rate > MAX_FLOW_RATE
            || self.burst() == 0
            || self.burst() > MAX_FLOW_RATE
        {
            return Err(format!(
                "VIP {vip}: {what} needs a rate and a burst of 1 to {MAX_FLOW_RATE} flows"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for FlowLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.rate, self.burst())
    }
}

impl FromStr for FlowLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid limit `{s}`: expected RATE or RATE/BURST (new flows per second), e.g. 1000/200"
            )
        };
        let (rate, burst) = match s.split_once('/') {
            Some((r, b)) => (r, Some(b.parse().map_err(|_| bad())?)),
            None => (s, None),
        };
        let l = FlowLimit {
            rate: rate.parse().map_err(|_| bad())?,
            burst,
        };
        if l.rate == 0 || l.burst() == 0 {
            return Err(bad());
        }
        Ok(l)
    }
}
