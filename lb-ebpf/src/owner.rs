//! Second chance on the backend (`lb decap`): does this host own the inner packet's flow, and
//! if not, send the packet on to the next hop the load balancer listed in the GUE private
//! data (format: `lb_common::second_chance`).
//!
//! A packet is ours when it is a SYN (a new connection starts wherever the current table
//! sends it), when a TCP socket that is not a listener matches it (established, SYN-received
//! request socket, TIME-WAIT), when it is the ACK of a handshake a listener answered with a
//! syncookie (`bpf_tcp_check_syncookie`: there is no request socket then), or when a connected
//! UDP socket matches it. Anything else belongs to a connection this host does not know: the
//! previous backend of the slot may own it.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, tcphdr},
    cty::c_void,
    helpers::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie},
};
use lb_common::{DecapStat, FAMILY_V4, PROTO_TCP, PROTO_UDP};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::ptr::{Frame, ptr_at};

/// `BPF_F_CURRENT_NETNS`: look sockets up in the receiving device's namespace.
const CURRENT_NETNS: u64 = u64::MAX;
const TCP_LISTEN: u32 = 10;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Bytes of a TCP header without options (what the syncookie check reads).
const TCP_HDR_LEN: usize = 20;

/// Whether this host owns the inner packet at `inner` (`Some(reason)`), or not (`None`).
/// `raw` is the program's context for the socket helpers.
#[inline(always)]
pub fn owned(raw: *mut c_void, ctx: &impl Frame, inner: usize, v4: bool) -> Option<DecapStat> {
    // Re-bounded: the offset came through a struct, and the verifier wants its range here.
    let inner = inner & 0x1ff;
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv6: unsafe { core::mem::zeroed() },
        },
    };
    let ip = if v4 {
        inner_ipv4(ctx, inner, &mut tuple)?
    } else {
        inner_ipv6(ctx, inner, &mut tuple)?
    };
    if ip.later_fragment {
        // A later fragment has no ports: only the stack can reassemble it.
        return Some(DecapStat::Decapsulated);
    }
    let l4 = ip.l4 & 0x3ff;
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        // ICMP and the rest: no socket to ask; the current backend takes them.
        return Some(DecapStat::Decapsulated);
    }
    let th: *const [u8; TCP_HDR_LEN] = if ip.proto == PROTO_TCP {
        ptr_at(ctx, l4)?
    } else {
        // UDP: ports only (8 bytes), read through the same pointer type's first bytes.
        ptr_at::<[u8; 8]>(ctx, l4)? as *const [u8; TCP_HDR_LEN]
    };
    // SAFETY: at least 8 bytes checked above for either protocol.
    let ports = unsafe { core::ptr::read_unaligned(th as *const [u8; 8]) };
    let (sport, dport) = (
        u16::from_ne_bytes([ports[0], ports[1]]),
        u16::from_ne_bytes([ports[2], ports[3]]),
    );
    if v4 {
        tuple.__bindgen_anon_1.ipv4.sport = sport;
        tuple.__bindgen_anon_1.ipv4.dport = dport;
    } else {
        tuple.__bindgen_anon_1.ipv6.sport = sport;
        tuple.__bindgen_anon_1.ipv6.dport = dport;
    }
    if ip.proto == PROTO_UDP {
        udp_owned(raw, &mut tuple, ip.size)
    } else {
        tcp_owned(raw, &mut tuple, &ip, th)
    }
}

/// The inner IP header as the ownership test needs it.
struct InnerIp {
    /// A fragment other than the first (no ports to look up).
    later_fragment: bool,
    /// Offset of the transport header.
    l4: usize,
    proto: u8,
    /// Bytes of the IP header the syncookie check reads.
    ip_len: usize,
    /// Bytes of `bpf_sock_tuple` for this family.
    size: usize,
    iph: *mut c_void,
}

/// Reads the inner IPv4 header at `inner` into `tuple`'s addresses.
#[inline(always)]
fn inner_ipv4(ctx: &impl Frame, inner: usize, tuple: &mut bpf_sock_tuple) -> Option<InnerIp> {
    let iph: *const Ipv4Hdr = ptr_at(ctx, inner)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*iph };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(ip.src_addr);
    tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(ip.dst_addr);
    Some(InnerIp {
        later_fragment: u16::from_be_bytes(ip.frags) & 0x1fff != 0,
        l4: inner + ihl,
        proto: ip.proto,
        ip_len: Ipv4Hdr::LEN,
        size: core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>(
        ),
        iph: iph as *mut c_void,
    })
}

/// Reads the inner IPv6 header at `inner` into `tuple`'s addresses.
#[inline(always)]
fn inner_ipv6(ctx: &impl Frame, inner: usize, tuple: &mut bpf_sock_tuple) -> Option<InnerIp> {
    let iph: *const Ipv6Hdr = ptr_at(ctx, inner)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*iph };
    let mut s = [0u32; 4];
    let mut d = [0u32; 4];
    for i in 0..4 {
        let a = &ip.src_addr[i * 4..i * 4 + 4];
        let b = &ip.dst_addr[i * 4..i * 4 + 4];
        s[i] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        d[i] = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    }
    tuple.__bindgen_anon_1.ipv6.saddr = s;
    tuple.__bindgen_anon_1.ipv6.daddr = d;
    Some(InnerIp {
        later_fragment: false,
        l4: inner + Ipv6Hdr::LEN,
        proto: ip.next_hdr,
        ip_len: Ipv6Hdr::LEN,
        size: core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>(
        ),
        iph: iph as *mut c_void,
    })
}

/// UDP: owned when a connected socket (one that names the client's port) matches.
#[inline(always)]
fn udp_owned(raw: *mut c_void, tuple: &mut bpf_sock_tuple, size: usize) -> Option<DecapStat> {
    // SAFETY: `tuple` is a valid tuple of the size passed; the socket is released below.
    let sk = unsafe { bpf_sk_lookup_udp(raw, tuple, size as u32, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return None;
    }
    let connected = unsafe { (*sk).dst_port } != 0;
    unsafe { bpf_sk_release(sk as *mut c_void) };
    connected.then_some(DecapStat::KeptSocket)
}

/// TCP: a SYN is always taken; otherwise owned by an established socket, or by a listener
/// whose syncookie the ACK carries.
#[inline(always)]
fn tcp_owned(
    raw: *mut c_void,
    tuple: &mut bpf_sock_tuple,
    ip: &InnerIp,
    th: *const [u8; TCP_HDR_LEN],
) -> Option<DecapStat> {
    // SAFETY: 20 bytes checked by the caller for TCP.
    let flags = unsafe { (*th)[13] };
    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        return Some(DecapStat::KeptSyn);
    }
    // SAFETY: as for UDP.
    let sk: *mut bpf_sock =
        unsafe { bpf_skc_lookup_tcp(raw, tuple, ip.size as u32, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return None;
    }
    let state = unsafe { (*sk).state };
    let mut kept = None;
    if state != TCP_LISTEN {
        kept = Some(DecapStat::KeptSocket);
    } else if flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK {
        // SAFETY: `iph` and `th` point into the packet, checked for the lengths passed.
        let rc = unsafe {
            bpf_tcp_check_syncookie(
                sk as *mut c_void,
                ip.iph,
                ip.ip_len as u32,
                th as *mut tcphdr,
                TCP_HDR_LEN as u32,
            )
        };
        if rc == 0 {
            kept = Some(DecapStat::KeptSyncookie);
        }
    }
    // SAFETY: the reference taken by the lookup.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    kept
}

/// Where the hop list sits and what it says; `count` 0: no list. A plain value rather than an
/// `Option`: with an `Option`, LLVM merged the empty case's register (a packet-end pointer)
/// into the offset arithmetic and the verifier refused the benchmark harness.
#[derive(Clone, Copy)]
pub struct Hops {
    /// Offset of the private data's first word.
    pub word: usize,
    pub next: u8,
    pub count: u8,
    pub family: u8,
}

impl Hops {
    pub const NONE: Hops = Hops {
        word: 0,
        next: 0,
        count: 0,
        family: 0,
    };
}

/// The outer IPv4 header checksum for `h` (checksum field ignored).
#[inline(always)]
pub fn ipv4_checksum(h: &[u8; 20]) -> u16 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 20 {
        if i != 10 {
            sum += u16::from_ne_bytes([h[i], h[i + 1]]) as u64;
        }
        i += 2;
    }
    lb_common::csum_fold(sum)
}

/// Whether the hop family matches the outer header's.
#[inline(always)]
pub fn hop_fits(h: &Hops, outer_v4: bool) -> bool {
    (h.family == FAMILY_V4) == outer_v4
}
