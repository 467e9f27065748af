//! The state rules both the program and the agent apply: a pair's phase and when it
//! expires, and which RST or FIN is in the window the pair last saw.
#[allow(unused_imports)]
use super::*;

/// Timeouts of a pair that are not in its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatTimes {
    /// Half-open pairs ([`DEFAULT_NAT_HALF_OPEN_S`]).
    pub half_open_s: u32,
    /// Closed pairs the backend keeps no TIME_WAIT for ([`DEFAULT_NAT_GRACE_S`]).
    pub grace_s: u32,
}

impl NatTimes {
    pub const DEFAULT: NatTimes = NatTimes {
        half_open_s: DEFAULT_NAT_HALF_OPEN_S,
        grace_s: DEFAULT_NAT_GRACE_S,
    };
}

/// Why a pair is still alive, or how it ended: what `lb stats` counts per part of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatPhase {
    /// TCP before the client's handshake ACK; UDP before the backend's answer.
    HalfOpen,
    Established,
    /// Closed and holding its port: 70 s (backend closed first) or the grace.
    Closing,
}

/// The phase of a pair whose entries carry flags `flags` (both ORed) and the seconds it may
/// stay quiet in it.
#[inline(always)]
pub const fn nat_phase(proto: u8, flags: u16, idle_s: u32, t: &NatTimes) -> (NatPhase, u32) {
    if proto != PROTO_TCP {
        return if flags & (NAT_F_ANSWERED | NAT_F_ESTABLISHED) != 0 {
            (NatPhase::Established, idle_s)
        } else {
            (NatPhase::HalfOpen, t.half_open_s)
        };
    }
    if flags & NAT_F_RST != 0 {
        return (NatPhase::Closing, t.grace_s);
    }
    if flags & NAT_F_CLIENT_FIN != 0 && flags & NAT_F_BACKEND_FIN != 0 {
        // The backend closed first (it is in TIME_WAIT), or the client's last ACK is not
        // seen (the backend may still be in LAST_ACK, retransmitting its FIN).
        let done = flags & NAT_F_CLIENT_FIRST != 0 && flags & NAT_F_LAST_ACK != 0;
        return (
            NatPhase::Closing,
            if done { t.grace_s } else { NAT_TCP_CLOSED_S },
        );
    }
    if flags & NAT_F_ESTABLISHED == 0 {
        return (NatPhase::HalfOpen, t.half_open_s);
    }
    (NatPhase::Established, idle_s)
}

/// Whether a connection whose directions carry `fwd` and `rev` (either may be missing) is
/// over at `now_s`: [`nat_phase`]'s time since the last packet either way.
#[inline(always)]
pub const fn nat_expired(
    proto: u8,
    fwd: Option<&NatEntry>,
    rev: Option<&NatEntry>,
    now_s: u32,
    t: &NatTimes,
) -> bool {
    let (mut last, mut idle, mut flags) = (0u32, 0u32, 0u16);
    if let Some(f) = fwd {
        last = f.last_seen;
        flags = f.flags;
        idle = f.idle_s;
    }
    if let Some(r) = rev {
        if r.last_seen > last {
            last = r.last_seen;
        }
        flags |= r.flags;
        if r.idle_s > idle {
            idle = r.idle_s;
        }
    }
    let (_, limit) = nat_phase(proto, flags, idle, t);
    now_s.saturating_sub(last) > limit
}

/// What the pair needs of one TCP segment (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSeg {
    pub seq: u32,
    pub ack: u32,
    /// `seq` plus the payload's length, plus one for a SYN and one for a FIN.
    pub end: u32,
    /// `TCP_*` flags.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Whether `x` lies in the serial-number range `lo..=hi` (RFC 1982 arithmetic).
#[inline(always)]
pub const fn seq_between(x: u32, lo: u32, hi: u32) -> bool {
    x.wrapping_sub(lo) <= hi.wrapping_sub(lo)
}

/// Whether a RST or FIN `seg` from the direction of entry `own` is in the window the pair
/// last saw (`peer`: the other direction's entry): from what the other side has acknowledged
/// of this direction, less one window, to the furthest byte this direction has sent, plus one
/// window (conntrack's check, with the bytes in flight as seen and an unscaled window for the
/// unknown). A direction that has sent nothing yet may only refuse what the other sent: a
/// RST whose ACK is exactly the other's end, or whose sequence number is exactly the other's
/// ACK.
#[inline(always)]
pub const fn nat_seq_ok(seg: &TcpSeg, own: &NatEntry, peer: &NatEntry) -> bool {
    if own.flags & NAT_F_SEEN == 0 {
        // RFC 793's reset for an unacceptable segment: with the ACK of what it refuses, or
        // (refusing a segment that carried an ACK) at that ACK.
        return if seg.flags & crate::TCP_ACK != 0 {
            peer.flags & NAT_F_SEEN != 0 && seg.ack == peer.seq_end
        } else {
            peer.flags & NAT_F_ACKED != 0 && seg.seq == peer.ack
        };
    }
    let base = if peer.flags & NAT_F_ACKED != 0 {
        peer.ack
    } else {
        own.seq_end
    };
    seq_between(
        seg.seq,
        base.wrapping_sub(NAT_SEQ_SLACK),
        own.seq_end.wrapping_add(NAT_SEQ_SLACK),
    )
}

/// Records segment `seg` in its direction's entry: the furthest byte sent and the furthest
/// acknowledgement, advanced only by a segment that starts within a window of what was seen
/// (a spoofed segment elsewhere moves nothing, so it cannot widen the RST window); the first
/// segment sets both. Writes only what moves.
#[inline(always)]
pub const fn nat_track(e: &mut NatEntry, seg: &TcpSeg) {
    if e.flags & NAT_F_SEEN == 0 {
        e.seq_end = seg.end;
        e.flags |= NAT_F_SEEN;
    } else if seq_between(
        seg.seq,
        e.seq_end.wrapping_sub(NAT_SEQ_SLACK),
        e.seq_end.wrapping_add(NAT_SEQ_SLACK),
    ) {
        if (seg.end.wrapping_sub(e.seq_end) as i32) > 0 {
            e.seq_end = seg.end;
        }
    } else {
        return;
    }
    if seg.flags & crate::TCP_ACK != 0
        && (e.flags & NAT_F_ACKED == 0 || (seg.ack.wrapping_sub(e.ack) as i32) > 0)
    {
        e.ack = seg.ack;
        e.flags |= NAT_F_ACKED;
    }
}
