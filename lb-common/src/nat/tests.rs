use super::*;

#[test]
fn incremental_equals_full() {
    // An IPv4 header, checksummed, then its addresses changed both ways.
    let mut h = [
        0x45u8, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 20, 0, 2, 10, 0, 0, 10,
    ];
    let c = csum_full(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let (os, od) = (word(&h[12..16]), word(&h[16..20]));
    h[12..16].copy_from_slice(&[10, 30, 0, 2]);
    h[16..20].copy_from_slice(&[10, 41, 0, 2]);
    let d = csum_delta(csum_delta(0, os, word(&h[12..16])), od, word(&h[16..20]));
    let old = u16::from_ne_bytes([h[10], h[11]]);
    let new = csum_apply(old, d);
    h[10..12].copy_from_slice(&new.to_ne_bytes());
    assert_eq!(csum_full(&h, 0), 0, "a valid header sums to zero");
}

const T: NatTimes = NatTimes {
    half_open_s: 5,
    grace_s: 2,
};

#[test]
fn expiry_follows_the_state() {
    let e = NatEntry {
        last_seen: 100,
        idle_s: 900,
        ..NatEntry::default()
    };
    let tcp =
        |f: u16, now| nat_expired(PROTO_TCP, Some(&NatEntry { flags: f, ..e }), None, now, &T);
    // Half-open (SYN, even answered): the half-open time.
    assert!(!tcp(0, 105));
    assert!(tcp(0, 106), "unanswered SYN");
    assert!(tcp(NAT_F_ANSWERED, 106), "SYN-ACK without the client's ACK");
    let est = NAT_F_ANSWERED | NAT_F_ESTABLISHED;
    assert!(!tcp(est, 1000));
    assert!(tcp(est, 1001));
    // A RST: the grace.
    assert!(!tcp(est | NAT_F_RST, 102));
    assert!(tcp(est | NAT_F_RST, 103));
    // One FIN is a half-close (still established).
    assert!(!tcp(est | NAT_F_CLIENT_FIN | NAT_F_CLIENT_FIRST, 1000));
    assert!(!tcp(est | NAT_F_BACKEND_FIN, 1000));
    // The backend closed first: 70 s (its TIME_WAIT).
    let both = est | NAT_F_CLIENT_FIN | NAT_F_BACKEND_FIN;
    assert!(!tcp(both, 170));
    assert!(tcp(both, 171));
    // The client closed first: 70 s until the backend's FIN is acknowledged, then the grace.
    assert!(!tcp(both | NAT_F_CLIENT_FIRST, 170));
    assert!(!tcp(both | NAT_F_CLIENT_FIRST | NAT_F_LAST_ACK, 102));
    assert!(tcp(both | NAT_F_CLIENT_FIRST | NAT_F_LAST_ACK, 103));
    // The last ACK alone (backend first) changes nothing.
    assert!(!tcp(both | NAT_F_LAST_ACK, 170));
    // Flags of either entry count, and the later last-seen.
    let rev = NatEntry {
        flags: NAT_F_REPLY | est,
        last_seen: 200,
        ..e
    };
    assert!(!nat_expired(PROTO_TCP, Some(&e), Some(&rev), 1100, &T));
    assert!(nat_expired(PROTO_TCP, Some(&e), Some(&rev), 1101, &T));
    // UDP: half-open until answered, then the idle time.
    let udp = NatEntry { idle_s: 30, ..e };
    assert!(nat_expired(crate::PROTO_UDP, Some(&udp), None, 106, &T));
    let answered = NatEntry {
        flags: NAT_F_ANSWERED,
        ..udp
    };
    assert!(!nat_expired(
        crate::PROTO_UDP,
        Some(&answered),
        None,
        130,
        &T
    ));
    assert!(nat_expired(
        crate::PROTO_UDP,
        Some(&answered),
        None,
        131,
        &T
    ));
}

fn seg(seq: u32, ack: u32, len: u32, flags: u8) -> TcpSeg {
    let extra = u32::from(flags & (crate::TCP_SYN | crate::TCP_FIN) != 0);
    TcpSeg {
        seq,
        ack,
        end: seq.wrapping_add(len + extra),
        flags,
        _pad: [0; 3],
    }
}

#[test]
fn only_in_window_rst_and_fin_count() {
    use crate::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
    let (mut c, mut b) = (NatEntry::default(), NatEntry::default());
    // Handshake: client ISN 1000, backend ISN u32::MAX - 10 (wraps).
    nat_track(&mut c, &seg(1000, 0, 0, TCP_SYN));
    assert_eq!((c.seq_end, c.flags & NAT_F_ACKED), (1001, 0));
    let isn_b = u32::MAX - 10;
    // Before the backend has sent anything, only a RST answering the SYN is accepted.
    assert!(nat_seq_ok(&seg(0, 1001, 0, TCP_RST | TCP_ACK), &b, &c));
    assert!(!nat_seq_ok(&seg(0, 1002, 0, TCP_RST | TCP_ACK), &b, &c));
    assert!(!nat_seq_ok(&seg(0, 1001, 0, TCP_RST), &b, &c));
    // A backend meeting a mid-connection segment (a re-placed connection) resets it at
    // the segment's ACK.
    let mut moved = c;
    nat_track(&mut moved, &seg(1001, 5555, 10, TCP_ACK));
    assert!(nat_seq_ok(&seg(5555, 0, 0, TCP_RST), &b, &moved));
    assert!(!nat_seq_ok(&seg(5556, 0, 0, TCP_RST), &b, &moved));
    nat_track(&mut b, &seg(isn_b, 1001, 0, TCP_SYN | TCP_ACK));
    assert_eq!((b.seq_end, b.ack), (isn_b.wrapping_add(1), 1001));
    nat_track(&mut c, &seg(1001, isn_b.wrapping_add(1), 100, TCP_ACK));
    nat_track(&mut b, &seg(isn_b.wrapping_add(1), 1101, 5000, TCP_ACK));
    assert_eq!(b.seq_end, isn_b.wrapping_add(5001), "wrapped past zero");
    // The backend's RST: at its next byte, or within a window either side.
    let next_b = b.seq_end;
    for s in [
        next_b,
        next_b + NAT_SEQ_SLACK,
        next_b.wrapping_sub(5000 + NAT_SEQ_SLACK),
    ] {
        assert!(nat_seq_ok(&seg(s, 0, 0, TCP_RST), &b, &c), "{s}");
    }
    // The client has acknowledged nothing of the backend's 5000 bytes: they are in flight.
    for s in [
        next_b + NAT_SEQ_SLACK + 1,
        next_b.wrapping_sub(5001 + NAT_SEQ_SLACK),
        next_b ^ 0x8000_0000,
    ] {
        assert!(!nat_seq_ok(&seg(s, 0, 0, TCP_RST), &b, &c), "{s}");
    }
    // Once the client acknowledges them, the window's low end moves up.
    nat_track(&mut c, &seg(1101, next_b, 0, TCP_ACK));
    assert!(!nat_seq_ok(
        &seg(next_b.wrapping_sub(5000 + NAT_SEQ_SLACK), 0, 0, TCP_RST),
        &b,
        &c
    ));
    assert!(nat_seq_ok(
        &seg(next_b.wrapping_sub(NAT_SEQ_SLACK), 0, 0, TCP_FIN),
        &b,
        &c
    ));
    // The client's FIN the same way.
    assert!(nat_seq_ok(&seg(1101, next_b, 0, TCP_FIN | TCP_ACK), &c, &b));
    assert!(!nat_seq_ok(
        &seg(900_000, next_b, 0, TCP_FIN | TCP_ACK),
        &c,
        &b
    ));
}

#[test]
fn spoofed_segments_move_nothing() {
    use crate::TCP_ACK;
    let mut c = NatEntry::default();
    nat_track(&mut c, &seg(1000, 0, 0, crate::TCP_SYN));
    let before = c;
    // Far from the window: neither the end nor the acknowledgement moves.
    nat_track(&mut c, &seg(1000 + 10 * NAT_SEQ_SLACK, 77, 10, TCP_ACK));
    assert_eq!(c, before);
    // In the window: both move; an older segment moves neither back.
    nat_track(&mut c, &seg(1001, 77, 10, TCP_ACK));
    assert_eq!((c.seq_end, c.ack), (1011, 77));
    nat_track(&mut c, &seg(1001, 50, 5, TCP_ACK));
    assert_eq!((c.seq_end, c.ack), (1011, 77));
}

#[test]
fn half_open_slots_stay_in_the_source_share() {
    let mut key = FlowKey {
        src: [0x0100_000a, 0, 0, 0],
        dst: [0x0a00_000a, 0, 0, 0],
        sport: 0,
        dport: 80,
        proto: PROTO_TCP,
        family: crate::FAMILY_V4,
        _pad: [0; 2],
    };
    let (slots, share) = (1024u32, 16u32);
    let mut seen = [false; 1024];
    for port in 0..2000u16 {
        key.sport = port;
        for i in 0..NAT_HALF_PROBES {
            seen[nat_half_index(&key, i, slots, share) as usize] = true;
        }
    }
    let used = seen.iter().filter(|s| **s).count();
    assert_eq!(
        used, share as usize,
        "one source, 2000 connections: its share only"
    );
    // Another source lands elsewhere (with these two addresses: checked, not assumed).
    key.src[0] = 0x0200_000a;
    let other = nat_half_index(&key, 0, slots, share) as usize;
    assert!(!seen[other] || used < slots as usize);
    // Successive probes of one connection differ.
    let a = nat_half_index(&key, 0, slots, share);
    let b = nat_half_index(&key, 1, slots, share);
    assert_ne!(a, b);
}

#[test]
fn ports_stay_in_range_and_differ_between_tries() {
    let mut seen = [false; 16];
    for i in 0..NAT_PORT_PROBES {
        let p = nat_port(0xdead_beef, i, 1000, 1015);
        assert!((1000..=1015).contains(&p));
        seen[(p - 1000) as usize] = true;
    }
    assert!(seen.iter().filter(|s| **s).count() >= 6);
    assert_eq!(nat_port(5, 0, 7, 7), 7);
}
