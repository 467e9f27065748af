//! The real [`Kernel`]: the reconciler's writes carried out on the loaded maps, with a mirror
//! of what they hold so a change costs only the writes it needs (no full read per change).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
};

use aya::maps::PerCpuValues;
use lb_common::{
    BACKEND_F_PRESENT, Backend, Counter, ENCAP_L2, FlowKey, LbConfig, PacketFacts, Previous,
    VIP_F_PRESENT, VipCounter, entry_decides,
};

use crate::{
    Dataplane, Error,
    agent::{
        guard::{Rates, Sources},
        kernel::{Counters, Kernel, LiveSlots, NatSweep, Swept, Totals},
        reconcile::{BackendTarget, Capacity, KernelView, Op, apply_to_view},
    },
    dataplane::{nat::NatSweeper, stats::StatsMaps},
    model::{BackendAddr, Mac},
    net::{addr_words, family, words_addr},
};

pub struct MapsKernel {
    dp: Dataplane,
    /// Source MAC of rewritten frames: the interface's own.
    lb_mac: [u8; 6],
    /// Outer source addresses of encapsulated packets, per family.
    sources: EncapSources,
    view: KernelView,
    /// The NAT source addresses are live (a NAT backend has existed in this run).
    nat_on: bool,
    /// Read handles on the counter maps, shared with readers that run without the agent's
    /// lock.
    counters: Arc<StatsMaps>,
    /// The new-flow limits the kernel holds (bucket state zero), as last read or written.
    rates: Rates,
}

/// The load balancer's own addresses that encapsulated packets come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncapSources {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
    /// The NAT address pool (`crate::nat_pool`): `--nat-source`, else `v4` and `v6`.
    pub nat_pool: Vec<IpAddr>,
    /// `nat_pool` was given with `--nat-source` (not the `v4`/`v6` fallback).
    pub nat_pool_given: bool,
}

impl EncapSources {
    /// The source for a backend of `addr`'s family.
    pub fn for_backend(&self, addr: IpAddr) -> Option<IpAddr> {
        match addr {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }
}

impl MapsKernel {
    /// Wraps `dp` and reads what its maps hold.
    pub fn new(dp: Dataplane, lb_mac: [u8; 6], sources: EncapSources) -> Result<Self, Error> {
        let counters = Arc::new(dp.stats.reader()?);
        let mut k = MapsKernel {
            counters,
            dp,
            lb_mac,
            sources,
            view: KernelView::default(),
            nat_on: false,
            rates: Rates::new(),
        };
        // Adopted maps whose program answers on this run's NAT addresses keep them on: zeroing
        // them until the first NAT backend is written back would pass the NAT connections'
        // replies to the stack meanwhile, which resets them.
        // Compared as sets: the map lists IPv4 first, `--nat-source` is in the order given.
        let mut pinned = k.dp.nat.pool();
        let mut wanted = k.sources.nat_pool.clone();
        let pinned_slots = k.dp.nat.slots();
        pinned.sort();
        wanted.sort();
        if !pinned.is_empty() && pinned == wanted {
            k.nat_addresses_on()?;
        } else {
            k.dp.nat.set_pool(&[])?;
            k.dp.vips.set_also_filtered(Vec::new())?;
        }
        k.dp.nat
            .forget_moved_refusals(&pinned_slots, &k.sources.nat_pool)?;
        k.resync()?;
        Ok(k)
    }

    /// Makes this run's NAT source addresses live (the program answers on them, and packets
    /// to them pass the VIP pre-filter) once a NAT backend exists: until then the load
    /// balancer's own address is none of the program's business.
    fn nat_addresses_on(&mut self) -> Result<(), Error> {
        if self.nat_on {
            return Ok(());
        }
        self.dp.nat.set_pool(&self.sources.nat_pool)?;
        let also: Vec<[u32; 4]> = self
            .sources
            .nat_pool
            .iter()
            .map(|a| addr_words(*a))
            .collect();
        self.dp.vips.set_also_filtered(also)?;
        self.nat_on = true;
        Ok(())
    }

    /// Zeroes entry `id` of a per-CPU counter map (an id changing hands starts at 0).
    fn zero<V: aya::Pod + Default>(
        map: &mut aya::maps::PerCpuArray<aya::maps::MapData, V>,
        name: &'static str,
        id: u32,
    ) -> Result<(), Error> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs")(e))?;
        let zeros = PerCpuValues::try_from(vec![V::default(); n])
            .map_err(Error::io("building per-CPU zeros"))?;
        map.set(id, zeros, 0)
            .map_err(|source| Error::Map { name, source })
    }

    fn set_backend(&mut self, id: u32, b: &BackendTarget, new_owner: bool) -> Result<(), Error> {
        // Checked when a change is made; a state saved by a run that had a source of this
        // family (the interface lost its address since) is refused here, and reported as not
        // converged, rather than sent from no address.
        if b.encap != ENCAP_L2 && self.sources.for_backend(b.addr.ip).is_none() {
            return Err(Error::Kernel(format!(
                "backend {}: no {} address to send from (give `lb run --encap-source ADDR`)",
                b.addr,
                if b.addr.ip.is_ipv4() { "IPv4" } else { "IPv6" }
            )));
        }
        if b.encap == lb_common::ENCAP_NAT {
            self.nat_addresses_on()?;
        }
        let old = self.dp.backends.get(id)?;
        let was_present = old.flags & BACKEND_F_PRESENT != 0;
        let entry = Backend {
            addr: addr_words(b.addr.ip),
            mac: b.mac.0,
            src_mac: self.lb_mac,
            ifindex: 0,
            generation: if new_owner || !was_present {
                old.generation.wrapping_add(1)
            } else {
                old.generation
            },
            flags: BACKEND_F_PRESENT | b.flags,
            family: family(b.addr.ip),
            encap: b.encap,
            port: b.addr.port.to_be(),
            outer_src: self.outer_src(b.encap, b.addr.ip),
        };
        if new_owner {
            // Counters first: the new owner's first packet must not be added to the old's.
            Self::zero(
                &mut self.dp.stats.backends,
                lb_common::BACKEND_STATS_MAP,
                id,
            )?;
        }
        self.dp.backends.set(id, &entry)
    }

    /// The outer source written for an encapsulated backend at `addr` (zero for L2).
    fn outer_src(&self, encap: u8, addr: IpAddr) -> [u32; 4] {
        match self.sources.for_backend(addr) {
            Some(src) if encap != ENCAP_L2 => addr_words(src),
            _ => [0; 4],
        }
    }

    /// What a backend entry read from the map stands for.
    fn target_of(b: &Backend) -> BackendTarget {
        BackendTarget {
            addr: BackendAddr::new(words_addr(b.addr, b.family), u16::from_be(b.port)),
            mac: Mac(b.mac),
            encap: b.encap,
            flags: b.flags & !BACKEND_F_PRESENT,
        }
    }

    /// Re-reads backend `id` into the mirror after a failed write.
    fn reread_backend(&mut self, id: u32) {
        match self.dp.backends.get(id) {
            Ok(b) if b.flags & BACKEND_F_PRESENT != 0 => {
                self.view.backends.insert(id, Self::target_of(&b));
            }
            _ => {
                self.view.backends.remove(&id);
            }
        }
    }
}

impl Kernel for MapsKernel {
    fn view(&self) -> &KernelView {
        &self.view
    }

    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        let result = match op {
            Op::RemoveVip { key, .. } => self.dp.remove_vip(key),
            Op::SetBackend {
                id,
                backend,
                new_owner,
            } => self.set_backend(*id, backend, *new_owner),
            Op::PublishVip {
                key,
                id,
                params,
                table,
                previous,
                new,
            } => {
                if *new {
                    Self::zero(&mut self.dp.stats.vips, lb_common::VIP_STATS_MAP, *id)?;
                    Self::zero(
                        &mut self.dp.stats.vip_guard,
                        lb_common::VIP_GUARD_STATS_MAP,
                        *id,
                    )?;
                }
                self.dp
                    .publish_vip(key, *id, *params, table, previous)
                    .map(drop)
            }
            Op::ClearBackend { id } => self.dp.backends.clear(*id),
        };
        match (&result, op) {
            (Ok(()), _) => apply_to_view(&mut self.view, op),
            (Err(_), Op::SetBackend { id, .. } | Op::ClearBackend { id }) => {
                self.reread_backend(*id)
            }
            (Err(_), Op::PublishVip { id, .. } | Op::RemoveVip { id, .. }) => {
                // The table may be half written: forget what we know so it is rewritten.
                self.view.published.remove(id);
                self.dp.slots.forget(*id);
                if let Ok(list) = self.dp.vips.list() {
                    self.view.vips = list.into_iter().collect();
                }
            }
        }
        result
    }

    fn resync(&mut self) -> Result<(), Error> {
        let mut view = KernelView {
            vips: self.dp.vips.list()?.into_iter().collect(),
            ..KernelView::default()
        };
        // A bound key whose id is not marked present is half made: treat it as unbound.
        let mut half = Vec::new();
        for (key, id) in &view.vips {
            if self.dp.vips.info(*id)?.flags & VIP_F_PRESENT == 0 {
                half.push(*key);
            }
        }
        for key in half {
            view.vips.remove(&key);
            self.dp.vips.unbind(&key)?;
        }
        for id in 1..self.dp.backends.capacity() {
            let mut b = self.dp.backends.get(id)?;
            if b.flags & BACKEND_F_PRESENT == 0 {
                continue;
            }
            // The outer source is this run's concern, not the desired state's: an entry
            // pinned by a run with another `--encap-source` is corrected here, in place (same
            // generation, so its flows stay).
            let t = Self::target_of(&b);
            if b.encap == lb_common::ENCAP_NAT {
                self.nat_addresses_on()?;
            }
            if b.encap != ENCAP_L2 && self.sources.for_backend(t.addr.ip).is_some() {
                let src = self.outer_src(b.encap, t.addr.ip);
                if b.outer_src != src {
                    b.outer_src = src;
                    self.dp.backends.set(id, &b)?;
                }
            }
            view.backends.insert(id, t);
        }
        for id in 0..self.dp.vips.capacity() {
            self.dp.slots.forget(id);
        }
        self.view = view;
        let mut guard = self.dp.guard.lock().unwrap_or_else(PoisonError::into_inner);
        guard.resync()?;
        self.rates = guard.read_rates(self.dp.vips.capacity())?;
        Ok(())
    }

    fn sync_sources(
        &mut self,
        want: &Arc<Sources>,
        rates: &Rates,
        prune: bool,
    ) -> Result<(), Error> {
        for (id, r) in rates {
            if !prune && self.rates.get(id) != Some(r) {
                self.dp
                    .guard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_rate(*id, r)?;
                self.rates.insert(*id, *r);
            }
        }
        if prune {
            let gone: Vec<u32> = self
                .rates
                .keys()
                .filter(|id| !rates.contains_key(id))
                .copied()
                .collect();
            for id in gone {
                self.dp
                    .guard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_rate(id, &lb_common::VipRate::default())?;
                self.rates.remove(&id);
            }
        }
        let mut guard = self.dp.guard.lock().unwrap_or_else(PoisonError::into_inner);
        if prune {
            guard.prune(want)
        } else {
            guard.add(want)
        }
    }

    fn apply_source_delta(
        &mut self,
        sources: &mut Arc<Sources>,
        add: &[(crate::agent::guard::SourceRule, u64)],
        remove: &[crate::agent::guard::SourceRule],
    ) -> Result<(), Error> {
        self.dp
            .guard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply_delta(sources, add, remove)
    }

    fn guard_writer(&self) -> Option<Arc<Mutex<crate::dataplane::guard::GuardTables>>> {
        Some(self.dp.guard.clone())
    }

    fn live_slots(&self, vip_id: u32) -> Result<Option<LiveSlots>, Error> {
        let info = self.dp.vips.info(vip_id)?;
        if info.flags & VIP_F_PRESENT == 0 || info.backend_count == 0 {
            return Ok(None);
        }
        let m = self.dp.slots.ring_size();
        let (mut table, mut previous) = (Vec::with_capacity(m as usize), Vec::new());
        for s in 0..m {
            let slot = self.dp.slots.get(vip_id, info.active_gen, s)?;
            table.push(slot.backend);
            if slot.in_window() && previous.is_empty() {
                previous = vec![Previous::default(); m as usize];
            }
            if !previous.is_empty() {
                previous[s as usize] = slot.previous;
            }
        }
        Ok(Some((table, previous)))
    }

    fn capacity(&self) -> Capacity {
        Capacity {
            vips: self.dp.vips.capacity(),
            backends: self.dp.backends.capacity(),
        }
    }

    fn ring_size(&self) -> u32 {
        self.dp.opts.ring_size
    }

    fn hash_seed(&self) -> u64 {
        self.dp.opts.hash_seed
    }

    fn flow_backend(&self, key: &FlowKey, vip_id: u32) -> Result<Option<u32>, Error> {
        // What the program decides for the flow's next packet (an ACK, now), by the same
        // rules: the established table first, then probation.
        let facts = PacketFacts {
            proto: key.proto,
            tcp_flags: lb_common::TCP_ACK,
            now_s: coarse_now_s(),
        };
        let info = self.dp.vips.info(vip_id)?;
        for f in [self.dp.flows.get(key)?, self.dp.flows.probation(key)?]
            .into_iter()
            .flatten()
        {
            let b = self.dp.backends.get(f.backend_id).ok();
            if f.vip_id == vip_id
                && entry_decides(&f, &info, b.as_ref(), &facts, self.dp.opts.fin_grace_s)
            {
                return Ok(Some(f.backend_id));
            }
        }
        // A NAT connection: its forward entry, while its backend is the same and not down
        // (what `lb_nat` checks).
        if let Ok(e) = self.dp.nat.fwd.get(key, 0)
            && let Ok(b) = self.dp.backends.get(e.backend_id)
            && b.flags & BACKEND_F_PRESENT != 0
            && b.flags & lb_common::BACKEND_F_DOWN == 0
            && b.generation == e.backend_generation
        {
            return Ok(Some(e.backend_id));
        }
        Ok(None)
    }

    fn counters(&self) -> Option<Arc<dyn Counters>> {
        Some(self.counters.clone())
    }

    fn outer_source(&self, backend: IpAddr) -> Option<IpAddr> {
        self.sources.for_backend(backend)
    }

    fn nat_pool(&self) -> Vec<IpAddr> {
        self.sources.nat_pool.clone()
    }

    fn nat_sources_given(&self) -> Vec<IpAddr> {
        if self.sources.nat_pool_given {
            self.sources.nat_pool.clone()
        } else {
            Vec::new()
        }
    }

    fn nat_sweeper(&self) -> Option<Arc<dyn NatSweep>> {
        Some(self.dp.nat_sweeper.clone())
    }

    fn capture(&self) -> Option<Arc<crate::capture::Capturer>> {
        Some(self.dp.capture.clone())
    }

    fn config(&self) -> LbConfig {
        self.dp.opts.config()
    }
}

impl Counters for StatsMaps {
    fn totals(&self) -> Result<Totals, Error> {
        self.global().map(|g| g.0)
    }

    fn vip(&self, id: u32) -> Result<VipCounter, Error> {
        StatsMaps::vip(self, id)
    }

    fn backend(&self, id: u32) -> Result<Counter, Error> {
        StatsMaps::backend(self, id)
    }

    fn vip_guard_dropped(&self, id: u32) -> Result<u64, Error> {
        StatsMaps::vip_guard_dropped(self, id)
    }

    fn top_sources(&self) -> Result<(Vec<(lb_common::TopKey, u64)>, u64), Error> {
        StatsMaps::top_sources(self)
    }
}

/// The sweep's handles, one sweep at a time, against the program's clock.
impl NatSweep for Mutex<NatSweeper> {
    fn sweep(&self) -> Result<Swept, Error> {
        let mut sweeper = self.lock().unwrap_or_else(PoisonError::into_inner);
        let s = sweeper.sweep(coarse_now_s())?;
        Ok(Swept {
            live: s.live,
            expired: s.expired,
            half_open: s.half_open,
            closing: s.closing,
            capacity: sweeper.capacity as usize,
            half_slots: sweeper.half_slots as usize,
            by_addr: s
                .by_addr
                .iter()
                .map(|(a, c)| crate::protocol::NatAddrView {
                    address: *a,
                    connections: c.live as u64,
                    half_open: c.half_open as u64,
                    closing: c.closing as u64,
                    ports_by_backend: c
                        .by_backend
                        .iter()
                        .map(|(b, n)| crate::protocol::NatBackendPorts {
                            backend: *b,
                            ports: *n as u64,
                        })
                        .collect(),
                    refused_no_port: c.refused_no_port,
                    refused_table_full: c.refused_table_full,
                })
                .collect(),
        })
    }
}

pub use crate::clock::coarse_now_s;
