//! What happens to a packet: a [`Verdict`] (the XDP action and the reason counted), and
//! [`act`], the one place that turns verdicts into XDP actions and counters.
use aya_ebpf::bindings::xdp_action;
use lb_common::Stat;

use crate::stats;

/// What to do with a packet, and why: the XDP action to return and the reason to count it
/// under. Made only by the constructors below, which say which action each kind of outcome
/// takes; [`act`] counts and returns. (It was an enum of four kinds, and the match that
/// turned it into an action and a counter ran on every path.)
#[derive(Clone, Copy)]
pub struct Verdict {
    pub(crate) stat: Stat,
    pub(crate) action: u32,
}

impl Verdict {
    /// Hand the packet to the kernel untouched.
    pub const fn pass(stat: Stat) -> Self {
        Self {
            stat,
            action: xdp_action::XDP_PASS,
        }
    }

    /// Drop the packet.
    pub const fn discard(stat: Stat) -> Self {
        Self {
            stat,
            action: xdp_action::XDP_DROP,
        }
    }

    /// The XDP action it takes.
    pub const fn action(self) -> u32 {
        self.action
    }

    /// The packet was rewritten; return this action (XDP_TX or a redirect); its reason is
    /// always [`Stat::Forwarded`].
    pub const fn forward(action: u32) -> Self {
        Self {
            stat: Stat::Forwarded,
            action,
        }
    }

    /// The packet was turned into an answer to its sender (an ICMP "too big"); return this
    /// action and count this reason.
    pub const fn reply(stat: Stat, action: u32) -> Self {
        Self { stat, action }
    }
}

/// The one place that turns a [`Verdict`] into an XDP action and a counter.
#[inline(always)]
pub fn act(verdict: Result<Verdict, Verdict>, len: u64) -> u32 {
    let (Ok(v) | Err(v)) = verdict;
    stats::count(v.stat, len);
    v.action
}
