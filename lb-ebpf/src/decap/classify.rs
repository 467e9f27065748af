//! Which frames are tunnels this program takes: to this host (`trust::is_local`), from a
//! trusted sender (`trust::trusted`), for a configured VIP (`maps::is_vip`); where the inner
//! packet starts, and the second-chance hop list if the GUE header carries one.
use lb_common::{
    DecapAddr, DecapStat, FAMILY_V4, FAMILY_V6, GUE_BASE_LEN, GUE_HOPS_WORD_LEN, HopsHeader,
    IPPROTO_IPIP, IPPROTO_IPV6, PROTO_UDP, UDP_HDR_LEN, hop_addr_len, parse_hops_word,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    maps::{DECAP_CONFIG, is_vip},
    owner::Hops,
    proto::{ETH_P_IP, ETH_P_IPV6},
    ptr::{Frame, ptr_at, unreadable},
    trust::{is_local, trusted},
};

/// The header `T` at `off` in the frame's first buffer, or why it cannot be read there:
/// split by a multi-buffer frame's buffer boundary, or past the frame's end (malformed).
#[inline(always)]
pub fn header<T>(ctx: &impl Frame, off: usize) -> Result<*const T, DecapStat> {
    ptr_at(ctx, off).ok_or_else(|| {
        unreadable(
            ctx,
            off + core::mem::size_of::<T>(),
            DecapStat::PassSplitHeaders,
            MALFORMED,
        )
    })
}

pub const NOT_ENCAP: DecapStat = DecapStat::PassNotEncap;
pub const MALFORMED: DecapStat = DecapStat::PassMalformed;

/// Where the inner packet starts and the Ethernet type it will carry; for a GUE packet with
/// a hop list (second chance), where the list is.
pub struct Found {
    pub inner: usize,
    pub inner_type: u16,
    pub hops: Hops,
}

/// An outer header that may carry a tunnel: where the payload starts and what it is.
struct Tunnel {
    /// Offset of the inner IP header.
    inner: usize,
    /// Inner family required by the outer protocol (IPIP, GUE variant 0); `None` for GUE
    /// variant 1 (read from the inner version nibble).
    family: Option<u32>,
    /// The second-chance hop list of a GUE variant-0 header.
    hops: Hops,
}

/// Whether the frame is a tunnel to this host for a configured VIP, and where its inner
/// packet is; otherwise why not.
#[inline(always)]
pub fn classify(ctx: &impl Frame) -> Result<Found, DecapStat> {
    let eth: *const EthHdr = header(ctx, 0)?;
    // SAFETY: checked by `ptr_at`.
    let ether_type = unsafe { (*eth).ether_type };
    let l3 = EthHdr::LEN;
    let tunnel = if ether_type == ETH_P_IP {
        outer_v4(ctx, l3)?
    } else if ether_type == ETH_P_IPV6 {
        outer_v6(ctx, l3)?
    } else {
        return Err(NOT_ENCAP);
    };
    let (vip, inner_type) = inner_dst(ctx, &tunnel)?;
    if !is_vip(&vip) {
        return Err(DecapStat::PassNotVip);
    }
    Ok(Found {
        inner: tunnel.inner,
        inner_type,
        hops: tunnel.hops,
    })
}

#[inline(always)]
fn outer_v4(ctx: &impl Frame, l3: usize) -> Result<Tunnel, DecapStat> {
    let ip: *const Ipv4Hdr = header(ctx, l3)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(MALFORMED);
    }
    if ip.proto != IPPROTO_IPIP && ip.proto != IPPROTO_IPV6 && ip.proto != PROTO_UDP {
        return Err(NOT_ENCAP);
    }
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(DecapStat::PassFragment);
    }
    let t = tunnel(ctx, l3 + ihl, ip.proto)?;
    let local = DecapAddr {
        addr: [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0],
        family: FAMILY_V4 as u32,
    };
    let src = [u32::from_ne_bytes(ip.src_addr), 0, 0, 0];
    sender_checked(t, &local, &src)
}

#[inline(always)]
fn outer_v6(ctx: &impl Frame, l3: usize) -> Result<Tunnel, DecapStat> {
    let ip: *const Ipv6Hdr = header(ctx, l3)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(MALFORMED);
    }
    let h = ip.next_hdr;
    if h != IPPROTO_IPIP && h != IPPROTO_IPV6 && h != PROTO_UDP {
        return Err(NOT_ENCAP);
    }
    let t = tunnel(ctx, l3 + Ipv6Hdr::LEN, h)?;
    let local = DecapAddr {
        addr: words(&ip.dst_addr),
        family: FAMILY_V6 as u32,
    };
    sender_checked(t, &local, &words(&ip.src_addr))
}

/// An IPv6 address as four words in network byte order.
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, x) in w.iter_mut().enumerate() {
        *x = u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]);
    }
    w
}

/// The tunnel `t`, when it is to this host (`local`, the outer destination) from a trusted
/// sender (`src`, the outer source, of `local`'s family). A tunnel to another address passes
/// untouched; one to this host from anyone else is dropped (`DecapStat::UntrustedSource`),
/// whatever it carries: its inner source could be anything.
#[inline(always)]
fn sender_checked(t: Tunnel, local: &DecapAddr, src: &[u32; 4]) -> Result<Tunnel, DecapStat> {
    if !is_local(local) {
        return Err(DecapStat::PassNotLocal);
    }
    if !trusted(src, local.family) {
        return Err(DecapStat::UntrustedSource);
    }
    Ok(t)
}

/// Where the inner packet starts after the outer IP header at `l4` with protocol `proto`.
#[inline(always)]
fn tunnel(ctx: &impl Frame, l4: usize, proto: u8) -> Result<Tunnel, DecapStat> {
    match proto {
        IPPROTO_IPIP => Ok(Tunnel {
            inner: l4,
            family: Some(FAMILY_V4 as u32),
            hops: Hops::NONE,
        }),
        IPPROTO_IPV6 => Ok(Tunnel {
            inner: l4,
            family: Some(FAMILY_V6 as u32),
            hops: Hops::NONE,
        }),
        _ => {
            let udp: *const UdpHdr = header(ctx, l4)?;
            // SAFETY: checked by `ptr_at`; the config global is plain data.
            let port = unsafe { core::ptr::read_volatile(&DECAP_CONFIG) }.gue_port;
            if u16::from_ne_bytes(unsafe { (*udp).dst }) != port {
                return Err(NOT_ENCAP);
            }
            gue(ctx, l4 + UDP_HDR_LEN)
        }
    }
}

/// A GUE payload at `at`: variant 1 (the inner IP header itself, version nibble 4 or 6) or
/// variant 0 (a GUE header; its private data may carry a hop list, `lb_common::second_chance`).
#[inline(always)]
fn gue(ctx: &impl Frame, at: usize) -> Result<Tunnel, DecapStat> {
    let h: *const [u8; GUE_BASE_LEN] = header(ctx, at)?;
    // SAFETY: checked by `ptr_at`.
    let h = unsafe { *h };
    match h[0] >> 6 {
        1 => Ok(Tunnel {
            inner: at,
            family: None,
            hops: Hops::NONE,
        }),
        0 => {
            // A control message (C bit) or flag fields are not ours to read.
            if h[0] & 0x20 != 0 || h[2] != 0 || h[3] != 0 {
                return Err(NOT_ENCAP);
            }
            let family = match h[1] {
                IPPROTO_IPIP => FAMILY_V4 as u32,
                IPPROTO_IPV6 => FAMILY_V6 as u32,
                _ => return Err(MALFORMED),
            };
            let words = (h[0] & 0x1f) as usize;
            let mut hops = Hops::NONE;
            if words > 0 {
                let w: *const [u8; 4] = header(ctx, at + GUE_BASE_LEN)?;
                // SAFETY: checked by `ptr_at`.
                if let HopsHeader::Hops {
                    next,
                    count,
                    family: hf,
                } = parse_hops_word(unsafe { *w })
                    && GUE_HOPS_WORD_LEN + count as usize * hop_addr_len(hf) <= words * 4
                {
                    hops = Hops {
                        word: at + GUE_BASE_LEN,
                        next,
                        count,
                        family: hf,
                    };
                }
            }
            Ok(Tunnel {
                inner: at + GUE_BASE_LEN + words * 4,
                family: Some(family),
                hops,
            })
        }
        _ => Err(MALFORMED),
    }
}

/// The inner packet's destination and the Ethernet type it will carry.
#[inline(always)]
fn inner_dst(ctx: &impl Frame, t: &Tunnel) -> Result<(DecapAddr, u16), DecapStat> {
    // Verifier note: a one-byte check compiles to `>=`, from which the verifier learns no
    // range; check the smallest inner header (20 bytes) instead.
    let first: *const [u8; Ipv4Hdr::LEN] = header(ctx, t.inner)?;
    // SAFETY: checked by `ptr_at`.
    let version = (unsafe { (*first)[0] } >> 4) as u32;
    if t.family.is_some_and(|f| f != version) {
        return Err(MALFORMED);
    }
    if version == FAMILY_V4 as u32 {
        let ip: *const Ipv4Hdr = header(ctx, t.inner)?;
        // SAFETY: checked by `ptr_at`.
        let dst = unsafe { (*ip).dst_addr };
        let addr = DecapAddr {
            addr: [u32::from_ne_bytes(dst), 0, 0, 0],
            family: FAMILY_V4 as u32,
        };
        Ok((addr, ETH_P_IP))
    } else if version == FAMILY_V6 as u32 {
        let ip: *const Ipv6Hdr = header(ctx, t.inner)?;
        // SAFETY: checked by `ptr_at`.
        let d = unsafe { (*ip).dst_addr };
        let mut addr = [0u32; 4];
        for (i, w) in addr.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([d[i * 4], d[i * 4 + 1], d[i * 4 + 2], d[i * 4 + 3]]);
        }
        Ok((
            DecapAddr {
                addr,
                family: FAMILY_V6 as u32,
            },
            ETH_P_IPV6,
        ))
    } else {
        Err(MALFORMED)
    }
}
