//! A freshly loaded data plane with a fixed set of VIPs and backends, for packet fixtures
//! (`BPF_PROG_TEST_RUN`) and benchmarks. The program is loaded but not attached.
use std::net::IpAddr;

use anyhow::Context as _;
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::{Backend, FlowKey, PROTO_TCP, PROTO_UDP, VIP_F_SRC_HASH, VipKey, slot_of};
use lb_userspace::{
    Dataplane, LoadOptions,
    agent::reconcile::VipParams,
    maglev::{self, MaglevBackend},
};

/// MAC the load balancer writes as the source of forwarded frames.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// Client and router MACs used in fixtures.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa0];

use lb_userspace::net::family;
pub use lb_userspace::net::{addr_words, flow_key, vip_key};

/// Frames from the router to the load balancer: what the fixtures and the bench send.
pub const SCENE: crate::frames::Frames = crate::frames::Frames {
    src: ROUTER_MAC,
    dst: LB_MAC,
};

/// Backend id `id`'s MAC in fixtures.
pub fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x0b, id as u8]
}

/// One VIP of the world.
#[derive(Clone, Debug)]
pub struct WorldVip {
    pub key: VipKey,
    pub id: u32,
    pub flags: u32,
    /// Seconds a UDP flow is remembered without a datagram.
    pub udp_idle_s: u32,
    pub backends: Vec<u32>,
    pub table: Vec<u32>,
    /// Previous backends per slot (second chance), or empty.
    pub previous: Vec<lb_common::Previous>,
}

/// The slot table of equal-weight backends `ids` (keys `backend-ID`).
fn table_of(ids: &[u32]) -> Vec<u32> {
    let mb: Vec<MaglevBackend> = ids
        .iter()
        .map(|id| MaglevBackend {
            id: *id,
            key: format!("backend-{id}"),
            weight: 1,
        })
        .collect();
    maglev::build(&mb, RING)
}

pub struct World {
    pub dp: Dataplane,
    pub vips: Vec<WorldVip>,
}

pub const RING: u32 = 1009;
/// The world's FIN grace: short, so fixtures can wait it out.
pub const FIN_GRACE_S: u32 = 1;
pub const SEED: u64 = 0x5eed_1234_abcd_0042;

/// The `ctx_in` of a BPF_PROG_TEST_RUN of a `len`-byte frame received on `ifindex`: a
/// `struct xdp_md` (data, data_end, data_meta, ingress_ifindex, rx_queue_index,
/// egress_ifindex). `data_end` is the length of the frame's first buffer: a smaller one than
/// `len` makes the kernel build a multi-buffer frame (the rest in page-sized fragments), as
/// a driver does for a jumbo frame (for `xdp.frags` programs; the kernel also caps the first
/// buffer at a page less its head and tail room).
pub fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    xdp_md_split(len, ifindex)
}

/// [`xdp_md`] with the first buffer `linear` bytes long.
pub fn xdp_md_split(linear: usize, ifindex: u32) -> Vec<u8> {
    [0, linear as u32, 0, ifindex, 0, 0u32]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

/// Whether this process loads the benchmark objects ([`use_bench_objects`]).
static BENCH_OBJECTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on this process loads the benchmark objects (`lb_userspace::BENCH_OBJECT`,
/// `DECAP_BENCH_OBJECT`: the product's programs plus the `bench_*` harnesses) wherever it
/// loads a world or the decap object: `lb-bench` calls it first. Everything else loads the
/// product objects, which hold no harness.
pub fn use_bench_objects() {
    BENCH_OBJECTS.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The load balancer's object this process loads (see [`use_bench_objects`]).
pub fn lb_object() -> &'static [u8] {
    if BENCH_OBJECTS.load(std::sync::atomic::Ordering::Relaxed) {
        lb_userspace::BENCH_OBJECT
    } else {
        lb_userspace::EBPF_OBJECT
    }
}

/// The decap object this process loads (see [`use_bench_objects`]).
pub fn decap_object() -> &'static [u8] {
    if BENCH_OBJECTS.load(std::sync::atomic::Ordering::Relaxed) {
        lb_userspace::DECAP_BENCH_OBJECT
    } else {
        lb_userspace::DECAP_OBJECT
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("valid literal address")
}

impl World {
    /// Loads a fresh data plane and publishes the standard VIPs:
    /// - 10.0.0.10:80/tcp -> 1,2,3   - 10.0.0.10:53/udp -> 1,2
    /// - 10.0.0.20:*/tcp  -> 2,3     - 10.0.0.30:443/tcp (source hash) -> 1,2,3
    /// - [2001:db8::10]:80/tcp -> 4,5 - [2001:db8::10]:53/udp -> 4,5
    /// - 10.0.0.40:80/tcp -> none (empty table)
    pub fn new() -> anyhow::Result<Self> {
        Self::with_flows(4096, false)
    }

    /// As [`World::new`] with a flow table of `flow_entries`, shared or per CPU.
    pub fn with_flows(flow_entries: u32, per_cpu_flows: bool) -> anyhow::Result<Self> {
        Self::with_options(LoadOptions {
            flow_entries,
            per_cpu_flows,
            ..Self::options()
        })
    }

    /// As [`World::new`] without a flow table (`--flow-table off`).
    pub fn stateless() -> anyhow::Result<Self> {
        Self::with_options(LoadOptions {
            flow_table_off: true,
            ..Self::options()
        })
    }

    /// As [`World::new`] without the flow cache (`--flow-cache-slots 0`): every packet of a
    /// flow is decided by the flow table.
    pub fn without_flow_cache() -> anyhow::Result<Self> {
        Self::with_options(LoadOptions {
            flow_cache_slots: 0,
            ..Self::options()
        })
    }

    /// The world's load options.
    pub fn options() -> LoadOptions {
        LoadOptions {
            ring_size: RING,
            max_vips: 16,
            max_backends: 64,
            flow_entries: 4096,
            hash_seed: SEED,
            fin_grace_s: FIN_GRACE_S,
            ..LoadOptions::default()
        }
    }

    /// As [`World::new`] loaded with `opts`.
    pub fn with_options(opts: LoadOptions) -> anyhow::Result<Self> {
        let dp = Dataplane::load_from(lb_object(), opts).context("loading the data plane")?;
        let mut world = World {
            dp,
            vips: Vec::new(),
        };
        for (id, addr) in [
            (1, "10.1.0.1"),
            (2, "10.1.0.2"),
            (3, "10.1.0.3"),
            (4, "2001:db8::b4"),
            (5, "2001:db8::b5"),
        ] {
            world.set_backend(id, ip(addr))?;
        }
        world.add_vip(vip_key(ip("10.0.0.10"), 80, PROTO_TCP), 0, &[1, 2, 3])?;
        world.add_vip(vip_key(ip("10.0.0.10"), 53, PROTO_UDP), 0, &[1, 2])?;
        world.add_vip(vip_key(ip("10.0.0.20"), 0, PROTO_TCP), 0, &[2, 3])?;
        world.add_vip(
            vip_key(ip("10.0.0.30"), 443, PROTO_TCP),
            VIP_F_SRC_HASH,
            &[1, 2, 3],
        )?;
        world.add_vip(vip_key(ip("2001:db8::10"), 80, PROTO_TCP), 0, &[4, 5])?;
        world.add_vip(vip_key(ip("2001:db8::10"), 53, PROTO_UDP), 0, &[4, 5])?;
        world.add_vip(vip_key(ip("10.0.0.40"), 80, PROTO_TCP), 0, &[])?;
        Ok(world)
    }

    /// Stores backend `id` at `addr`, reached through the receiving interface (XDP_TX).
    pub fn set_backend(&mut self, id: u32, addr: IpAddr) -> anyhow::Result<()> {
        self.set_backend_via(id, addr, 0)
    }

    /// Sets backend `id`'s `BACKEND_F_DRAINED`/`BACKEND_F_DOWN` bits, keeping its generation
    /// (as the agent does when a backend is drained or fails its health check).
    pub fn set_backend_flags(&mut self, id: u32, flags: u32) -> anyhow::Result<()> {
        let old = self.dp.backends.get(id)?;
        self.dp.backends.set(id, &Backend { flags, ..old })?;
        Ok(())
    }

    /// Sets the `VIP_F_*` flags of VIP number `index` and publishes it.
    pub fn set_vip_flags(&mut self, index: usize, flags: u32) -> anyhow::Result<()> {
        let mut v = self.vips[index].clone();
        v.flags = flags;
        self.publish(&mut v)?;
        self.vips[index] = v;
        Ok(())
    }

    /// Sets the UDP idle time of VIP number `index` and publishes it.
    pub fn set_udp_idle(&mut self, index: usize, secs: u32) -> anyhow::Result<()> {
        let mut v = self.vips[index].clone();
        v.udp_idle_s = secs;
        self.publish(&mut v)?;
        self.vips[index] = v;
        Ok(())
    }

    /// Stores backend `id` at `addr`, reached through interface `ifindex` (0: the receiving one).
    pub fn set_backend_via(&mut self, id: u32, addr: IpAddr, ifindex: u32) -> anyhow::Result<()> {
        let old = self.dp.backends.get(id)?;
        let b = Backend {
            addr: addr_words(addr),
            mac: backend_mac(id),
            src_mac: LB_MAC,
            ifindex,
            generation: old.generation + 1,
            flags: 0,
            family: family(addr),
            encap: lb_common::ENCAP_L2,
            port: 0,
            outer_src: [0; 4],
        };
        self.dp.backends.set(id, &b)?;
        Ok(())
    }

    /// Stores backend `id` at `addr`, reached by encapsulation `encap` (`ENCAP_IPIP` or
    /// `ENCAP_GUE`) from outer source `src`.
    pub fn set_backend_encap(
        &mut self,
        id: u32,
        addr: IpAddr,
        encap: u8,
        src: IpAddr,
    ) -> anyhow::Result<()> {
        let old = self.dp.backends.get(id)?;
        let b = Backend {
            addr: addr_words(addr),
            generation: old.generation + 1,
            flags: 0,
            family: family(addr),
            encap,
            outer_src: addr_words(src),
            ..Backend::default()
        };
        self.dp.backends.set(id, &b)?;
        Ok(())
    }

    /// Stores backend `id` as a NAT backend at `addr:port` (port 0: the VIP's), translated
    /// from source `src`, which is also made a NAT address the program answers on.
    pub fn set_backend_nat(
        &mut self,
        id: u32,
        addr: IpAddr,
        port: u16,
        src: IpAddr,
    ) -> anyhow::Result<()> {
        self.set_backend_encap(id, addr, lb_common::ENCAP_NAT, src)?;
        let mut b = self.dp.backends.get(id)?;
        b.port = port.to_be();
        self.dp.backends.set(id, &b)?;
        // `src` becomes its family's whole pool (the agent's pool without `--nat-source`).
        let mut pool: Vec<IpAddr> = self.dp.nat.pool();
        pool.retain(|a| a.is_ipv4() != src.is_ipv4());
        pool.push(src);
        self.set_nat_pool(&pool)
    }

    /// Writes the NAT address pool and lets its addresses through the VIP pre-filter, as the
    /// agent does.
    pub fn set_nat_pool(&mut self, pool: &[IpAddr]) -> anyhow::Result<()> {
        self.dp.nat.set_pool(pool)?;
        let also = pool.iter().map(|a| addr_words(*a)).collect();
        self.dp.vips.set_also_filtered(also)?;
        Ok(())
    }

    /// Adds a VIP with equal-weight `backends` and publishes its table.
    pub fn add_vip(&mut self, key: VipKey, flags: u32, backends: &[u32]) -> anyhow::Result<()> {
        let id = self.vips.len() as u32;
        let mut v = WorldVip {
            key,
            id,
            flags,
            udp_idle_s: lb_common::DEFAULT_UDP_IDLE_S,
            backends: backends.to_vec(),
            table: Vec::new(),
            previous: Vec::new(),
        };
        self.publish(&mut v)?;
        self.vips.push(v);
        Ok(())
    }

    fn publish(&mut self, v: &mut WorldVip) -> anyhow::Result<()> {
        v.table = table_of(&v.backends);
        let params = VipParams {
            flags: v.flags,
            udp_idle_s: v.udp_idle_s,
        };
        self.dp
            .publish_vip(&v.key, v.id, params, &v.table, &v.previous)?;
        Ok(())
    }

    /// Replaces the backend set of VIP number `index` with second chance: each slot that
    /// changes hands carries its old backend as the first previous one, then the previous
    /// ones it had (the new owner left out, at most `PREVIOUS_HOPS`).
    pub fn move_with_previous(&mut self, index: usize, backends: &[u32]) -> anyhow::Result<()> {
        let mut v = self.vips[index].clone();
        let old = v.table.clone();
        let before = std::mem::take(&mut v.previous);
        v.backends = backends.to_vec();
        let table = table_of(&v.backends);
        v.previous = table
            .iter()
            .zip(&old)
            .enumerate()
            .map(|(s, (n, o))| {
                let had = before.get(s).copied().unwrap_or_default();
                if n == o {
                    return had;
                }
                let mut p = lb_common::Previous::default();
                let ids = std::iter::once(*o)
                    .chain(had)
                    .filter(|id| *id != 0 && id != n);
                for (slot, id) in p.iter_mut().zip(ids) {
                    *slot = id;
                }
                p
            })
            .collect();
        v.table = table;
        let params = VipParams {
            flags: v.flags,
            udp_idle_s: v.udp_idle_s,
        };
        self.dp
            .publish_vip(&v.key, v.id, params, &v.table, &v.previous)?;
        self.vips[index] = v;
        Ok(())
    }

    /// Replaces the backend set of VIP number `index` and publishes the new table.
    pub fn set_vip_backends(&mut self, index: usize, backends: &[u32]) -> anyhow::Result<()> {
        let mut v = self.vips[index].clone();
        v.backends = backends.to_vec();
        self.publish(&mut v)?;
        self.vips[index] = v;
        Ok(())
    }

    /// The VIP a flow key is for (exact, then wildcard), as the kernel would find it.
    pub fn vip_for(&self, key: &FlowKey) -> Option<&WorldVip> {
        let exact = VipKey {
            addr: key.dst,
            port: key.dport,
            proto: key.proto,
            family: key.family,
        };
        let wild = VipKey { port: 0, ..exact };
        self.vips
            .iter()
            .find(|v| v.key == exact)
            .or_else(|| self.vips.iter().find(|v| v.key == wild))
    }

    /// The backend the slot table gives `key` (what a new flow gets), computed in userspace.
    pub fn table_backend(&self, key: &FlowKey) -> Option<u32> {
        let v = self.vip_for(key)?;
        if v.table.is_empty() {
            return None;
        }
        let slot = slot_of(key, SEED, v.flags & VIP_F_SRC_HASH != 0, RING)?;
        Some(v.table[slot as usize])
    }

    /// Runs the program once on `frame` as if received on interface `ifindex` (of the
    /// calling thread's namespace); returns the action and output frame.
    pub fn run_on(&mut self, frame: &[u8], ifindex: u32) -> anyhow::Result<(u32, Vec<u8>)> {
        self.run_split(frame, ifindex, frame.len())
    }

    /// [`World::run_on`] with the frame's first buffer `linear` bytes long and the rest in
    /// fragments (a multi-buffer frame, as a driver at a jumbo MTU makes).
    pub fn run_split(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        linear: usize,
    ) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let ctx = xdp_md_split(linear.min(frame.len()), ifindex);
        let prog = self.dp.lb_program()?;
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// Runs the load-balancing program once on `frame`; returns the action and output frame.
    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        run_once(self.dp.lb_program()?, frame)
    }
}

/// One pass of `prog` over `frame`: the XDP action and the output frame.
pub fn run_once(prog: &Xdp, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out))
}

/// Pins the calling thread to CPU 0, for good: its BPF_PROG_TEST_RUN runs then all fill and
/// read CPU 0's per-CPU map values (the flow cache), which tests read back.
pub fn pin_to_cpu0() -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it, and
    // sched_setaffinity reads it for the calling thread (pid 0).
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    anyhow::ensure!(
        r == 0,
        "pinning to CPU 0: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}
