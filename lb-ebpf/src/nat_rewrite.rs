//! The NAT rewrite: addresses and ports of a packet (or of an ICMP error and its quote)
//! replaced by a NAT entry's, with incremental checksum updates (RFC 1624) for the IPv4
//! header, TCP/UDP (pseudo-header addresses and ports) and ICMP/ICMPv6.
use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, NatEntry, PROTO_TCP, Stat, csum_apply, csum_delta};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    Verdict,
    parse::{Parsed, ptr_at_mut},
};

const BROKEN: Verdict = Verdict::discard(Stat::DropMalformed);
/// Offsets of the checksum in the TCP and UDP headers.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    u32::from(sport) | (u32::from(dport) << 16)
}

/// Rewrites addresses and ports to `to`, updating the IPv4 header checksum and the TCP/UDP
/// checksum (pseudo-header addresses and ports) incrementally.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Parsed, to: &NatEntry) -> Result<(), Verdict> {
    let k = &pkt.key;
    // Verifier note: offsets re-bounded after travelling through the struct.
    let l3 = pkt.ip.l3 & 0x1f;
    let l4 = pkt.ip.l4 & 0x7f;
    let mut d = 0u64;
    if k.family == FAMILY_V4 {
        d = csum_delta(d, k.src[0], to.src[0]);
        d = csum_delta(d, k.dst[0], to.dst[0]);
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, l3).ok_or(BROKEN)?;
        // SAFETY: checked by `ptr_at_mut`.
        unsafe {
            (*ip).src_addr = to.src[0].to_ne_bytes();
            (*ip).dst_addr = to.dst[0].to_ne_bytes();
            let c = u16::from_ne_bytes((*ip).check);
            (*ip).check = csum_apply(c, d).to_ne_bytes();
        }
    } else {
        let mut i = 0;
        while i < 4 {
            d = csum_delta(d, k.src[i], to.src[i]);
            d = csum_delta(d, k.dst[i], to.dst[i]);
            i += 1;
        }
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, l3).ok_or(BROKEN)?;
        // SAFETY: checked by `ptr_at_mut`.
        unsafe {
            (*ip).src_addr = words_bytes(&to.src);
            (*ip).dst_addr = words_bytes(&to.dst);
        }
    }
    d = csum_delta(
        d,
        ports_word(k.sport, k.dport),
        ports_word(to.sport, to.dport),
    );
    let (csum_at, udp) = if k.proto == PROTO_TCP {
        (TCP_CSUM, false)
    } else {
        (UDP_CSUM, true)
    };
    let ports: *mut [u16; 2] = ptr_at_mut(ctx, l4).ok_or(BROKEN)?;
    let csum: *mut u16 = ptr_at_mut(ctx, l4 + csum_at).ok_or(BROKEN)?;
    // SAFETY: both checked by `ptr_at_mut`.
    unsafe {
        *ports = [to.sport, to.dport];
        let c = *csum;
        // An IPv4 UDP datagram without a checksum keeps none.
        if !(udp && c == 0 && k.family == FAMILY_V4) {
            let n = csum_apply(c, d);
            *csum = if udp && n == 0 { 0xffff } else { n };
        }
    }
    Ok(())
}

/// Offset of the checksum in the ICMP header, and the ICMP header's length.
const ICMP_CSUM: usize = 2;
const ICMP_HDR: usize = 8;
/// Offsets of the addresses in an IPv6 header.
const V6_SRC: usize = 8;
const V6_DST: usize = 24;

/// Translates an ICMP error about a NAT'ed flow with that flow's entry `to` (either
/// direction): the outer header becomes `to.src` -> `to.dst`, and the quoted packet, one that
/// went the other way, becomes the one that side sent (`to.dst:to.dport` -> `to.src:to.sport`),
/// so the receiver's stack matches it to its own connection. The quoted IPv4 header checksum
/// and the ICMP checksum (ICMPv6: with its pseudo-header) are updated; the quoted TCP/UDP
/// checksum is left as quoted (nobody verifies a quote's). A quote with IPv4 options is
/// passed.
#[inline(always)]
pub fn rewrite_icmp(ctx: &XdpContext, pkt: &Parsed, to: &NatEntry) -> Result<(), Verdict> {
    let k = &pkt.key;
    let l3 = pkt.ip.l3 & 0x1f;
    let l4 = pkt.ip.l4 & 0x7f;
    let inner = l4 + ICMP_HDR;
    let icmp_csum: *mut u16 = ptr_at_mut(ctx, l4 + ICMP_CSUM).ok_or(BROKEN)?;
    // The quote, turned around by the parser into `k`: old inner source k.dst, destination
    // k.src, ports (k.dport, k.sport).
    let pd = csum_delta(
        0,
        ports_word(k.dport, k.sport),
        ports_word(to.dport, to.sport),
    );
    if k.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, l3).ok_or(BROKEN)?;
        let qip: *mut Ipv4Hdr = ptr_at_mut(ctx, inner).ok_or(BROKEN)?;
        let qports: *mut [u16; 2] = ptr_at_mut(ctx, inner + Ipv4Hdr::LEN).ok_or(BROKEN)?;
        // SAFETY: every pointer checked by `ptr_at_mut`.
        unsafe {
            if (*qip).vihl != 0x45 {
                return Err(Verdict::pass(Stat::PassNatIcmp));
            }
            let (osrc, odst) = (
                u32::from_ne_bytes((*ip).src_addr),
                u32::from_ne_bytes((*ip).dst_addr),
            );
            let d = csum_delta(csum_delta(0, osrc, to.src[0]), odst, to.dst[0]);
            (*ip).src_addr = to.src[0].to_ne_bytes();
            (*ip).dst_addr = to.dst[0].to_ne_bytes();
            (*ip).check = csum_apply(u16::from_ne_bytes((*ip).check), d).to_ne_bytes();
            let qd = csum_delta(csum_delta(0, k.dst[0], to.dst[0]), k.src[0], to.src[0]);
            let old_qcheck = u16::from_ne_bytes((*qip).check);
            let new_qcheck = csum_apply(old_qcheck, qd);
            (*qip).src_addr = to.dst[0].to_ne_bytes();
            (*qip).dst_addr = to.src[0].to_ne_bytes();
            (*qip).check = new_qcheck.to_ne_bytes();
            *qports = [to.dport, to.sport];
            // ICMPv4 has no pseudo-header: the quote's bytes only.
            let cd = csum_delta(qd + pd, u32::from(old_qcheck), u32::from(new_qcheck));
            *icmp_csum = csum_apply(*icmp_csum, cd);
        }
    } else {
        // Addresses as words, in place: copies would cost stack the program has not got.
        let osrc: *mut [u32; 4] = ptr_at_mut(ctx, l3 + V6_SRC).ok_or(BROKEN)?;
        let odst: *mut [u32; 4] = ptr_at_mut(ctx, l3 + V6_DST).ok_or(BROKEN)?;
        let qsrc: *mut [u32; 4] = ptr_at_mut(ctx, inner + V6_SRC).ok_or(BROKEN)?;
        let qdst: *mut [u32; 4] = ptr_at_mut(ctx, inner + V6_DST).ok_or(BROKEN)?;
        let qports: *mut [u16; 2] = ptr_at_mut(ctx, inner + Ipv6Hdr::LEN).ok_or(BROKEN)?;
        // SAFETY: every pointer checked by `ptr_at_mut`.
        unsafe {
            let mut d = pd;
            let mut i = 0;
            while i < 4 {
                // Pseudo-header (outer addresses) and quoted addresses.
                d = csum_delta(d, (*osrc)[i], to.src[i]);
                d = csum_delta(d, (*odst)[i], to.dst[i]);
                d = csum_delta(d, (*qsrc)[i], to.dst[i]);
                d = csum_delta(d, (*qdst)[i], to.src[i]);
                (*osrc)[i] = to.src[i];
                (*odst)[i] = to.dst[i];
                (*qsrc)[i] = to.dst[i];
                (*qdst)[i] = to.src[i];
                i += 1;
            }
            *qports = [to.dport, to.sport];
            *icmp_csum = csum_apply(*icmp_csum, d);
        }
    }
    Ok(())
}

#[inline(always)]
fn words_bytes(w: &[u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}
