//! Next hop by the kernel's FIB (`bpf_fib_lookup`): the egress interface, both MACs, and the
//! path MTU check, for encapsulated packets whose backend is behind routers.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, bpf_redir_neigh,
        bpf_redir_neigh__bindgen_ty_1,
    },
    cty::c_void,
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
};
use lb_common::{FAMILY_V4, Stat};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where an outer packet goes.
#[derive(Clone, Copy)]
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// What the FIB said about an outer packet.
pub enum Fib {
    Hop(NextHop),
    /// The route is fine but the next hop's MAC is not known yet.
    NoNeighbour,
    /// Larger than the egress MTU (the value given).
    TooBig(u32),
    /// No usable route: drop with this reason.
    Fail(Stat),
}

/// The outer packet a lookup is for. Addresses and ports in network byte order.
pub struct Outer {
    pub family: u8,
    pub proto: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    /// Outer IP total length, for the MTU check.
    pub len: u16,
    pub tos: u8,
    /// Interface the lookup is made from (the receiving one, or the egress one with
    /// `flags = BPF_FIB_LOOKUP_OUTPUT`).
    pub ifindex: u32,
}

/// Route part of a lookup without the neighbour: the egress interface and the next hop's
/// address (the gateway, or the destination itself on a connected route), for
/// `bpf_redirect_neigh` (tc), which resolves the neighbour itself.
#[inline(always)]
pub fn route(ctx: *mut c_void, o: &Outer) -> Option<(u32, [u32; 4])> {
    let mut p = params(o);
    // SAFETY: `p` is a valid, writable params struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    } as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    // SAFETY: the kernel wrote the next hop into the destination field of the family asked.
    let nh = if o.family == FAMILY_V4 {
        [unsafe { p.__bindgen_anon_4.ipv4_dst }, 0, 0, 0]
    } else {
        unsafe { p.__bindgen_anon_4.ipv6_dst }
    };
    Some((p.ifindex, nh))
}

const BPF_FIB_LOOKUP_SKIP_NEIGH: u32 = 4;

/// tc: sends the skb out of `ifindex` to next hop `nh` (of `family`, as [`route`] gave it),
/// the neighbour resolved by the kernel (`bpf_redirect_neigh`). Returns the tc action.
#[inline(always)]
pub fn redirect_neigh(ifindex: u32, family: u8, nh: [u32; 4]) -> i32 {
    let v4 = family == FAMILY_V4;
    let mut to = bpf_redir_neigh {
        nh_family: u32::from(if v4 { AF_INET } else { AF_INET6 }),
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv6_nh: [0; 4] },
    };
    if v4 {
        to.__bindgen_anon_1.ipv4_nh = nh[0];
    } else {
        to.__bindgen_anon_1.ipv6_nh = nh;
    }
    // SAFETY: `to` is a valid params struct of the size passed.
    (unsafe {
        bpf_redirect_neigh(
            ifindex,
            &mut to,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    }) as i32
}

#[inline(always)]
fn params(o: &Outer) -> FibParams {
    // SAFETY: plain-data C struct, all-zero is a valid value.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.l4_protocol = o.proto;
    p.sport = o.sport;
    p.dport = o.dport;
    p.__bindgen_anon_1.tot_len = o.len;
    p.ifindex = o.ifindex;
    if o.family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_2.tos = o.tos;
        p.__bindgen_anon_3.ipv4_src = o.src[0];
        p.__bindgen_anon_4.ipv4_dst = o.dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = o.src;
        p.__bindgen_anon_4.ipv6_dst = o.dst;
    }
    p
}

/// Looks the outer packet up. `ctx` is the program's context (XDP or skb).
#[inline(always)]
pub fn lookup(ctx: *mut c_void, o: &Outer, flags: u32) -> Fib {
    let mut p = params(o);
    // SAFETY: `p` is a valid, writable params struct of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx, &mut p, core::mem::size_of::<FibParams>() as i32, flags) }
        as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Fib::Hop(NextHop {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Fib::NoNeighbour,
        // SAFETY: the kernel wrote `mtu_result` with this return code.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            Fib::TooBig(u32::from(unsafe { p.__bindgen_anon_1.mtu_result }))
        }
        BPF_FIB_LKUP_RET_FWD_DISABLED => Fib::Fail(Stat::DropForwardingDisabled),
        _ => Fib::Fail(Stat::DropNoRoute),
    }
}
