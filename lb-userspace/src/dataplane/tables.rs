//! Typed wrappers over the data-plane maps, one method per operation.
use std::collections::HashMap as StdHashMap;

use std::os::fd::AsFd as _;

use aya::maps::{Array, HashMap, IterableMap as _, MapData, MapError};
use lb_common::{
    BACKEND_F_PRESENT, BACKENDS_MAP, Backend, FLOW_CACHE_MAP, FLOWS_MAP, FLOWS_NEW_MAP,
    FlowCacheSlot, FlowKey, FlowValue, ProbationSlot, SLOTS_MAP, Slot, TableKey, VIP_FILTER_MAP,
    VIP_FILTER_WORDS, VIP_INDEX_MAP, VIP_INDEX_PROBES, VIP_INDEX_SLOTS, VIP_INFO_MAP, VIPS_MAP,
    VipIndexEntry, VipInfo, VipKey, flow_cache_index, probation_check, probation_hash,
    probation_slot, slot_index, vip_filter_bit, vip_index_slot,
};

use crate::Error;

fn err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// The VIP maps: `LB_VIPS` (key -> id), `LB_VIP_INFO` (id -> state) and the address
/// pre-filter `LB_VIP_FILTER`, kept in step with the keys.
pub struct VipTable {
    ids: HashMap<MapData, VipKey, u32>,
    info: Array<MapData, VipInfo>,
    filter: Array<MapData, u64>,
    /// The filter words as last written.
    filter_words: Vec<u64>,
    index: Array<MapData, VipIndexEntry>,
    /// The index entries as last written.
    index_entries: Vec<VipIndexEntry>,
    /// Addresses that pass the pre-filter without being VIPs: the NAT source addresses, whose
    /// packets (backends' answers) the program must see.
    also_filtered: Vec<[u32; 4]>,
}

/// The index entries for `bound` keys: each at the first free of its probe positions, keys
/// visited in order so the layout is the same whatever the history. A key with no free
/// position stays out (the program finds it in the hash).
pub fn index_layout(bound: &[(VipKey, u32)]) -> Vec<VipIndexEntry> {
    let mut out = vec![VipIndexEntry::default(); VIP_INDEX_SLOTS as usize];
    let mut keys = bound.to_vec();
    keys.sort();
    for (key, id) in keys {
        let first = vip_index_slot(&key);
        for i in 0..VIP_INDEX_PROBES {
            let e = &mut out[((first + i) & (VIP_INDEX_SLOTS - 1)) as usize];
            if e.key.family == 0 {
                *e = VipIndexEntry { key, id };
                break;
            }
        }
    }
    out
}

impl VipTable {
    pub fn new(
        ids: HashMap<MapData, VipKey, u32>,
        info: Array<MapData, VipInfo>,
        filter: Array<MapData, u64>,
        index: Array<MapData, VipIndexEntry>,
        also_filtered: Vec<[u32; 4]>,
    ) -> Result<Self, Error> {
        let filter_words = (0..VIP_FILTER_WORDS)
            .map(|i| filter.get(&i, 0).map_err(err(VIP_FILTER_MAP)))
            .collect::<Result<_, _>>()?;
        let index_entries = (0..VIP_INDEX_SLOTS)
            .map(|i| index.get(&i, 0).map_err(err(VIP_INDEX_MAP)))
            .collect::<Result<_, _>>()?;
        let mut t = VipTable {
            ids,
            info,
            filter,
            filter_words,
            index,
            index_entries,
            also_filtered,
        };
        // Pinned maps from before the index existed, or a write that failed: made right now.
        t.sync_filter()?;
        Ok(t)
    }

    /// Lets packets to `addrs` past the pre-filter too (the NAT source addresses).
    pub fn set_also_filtered(&mut self, addrs: Vec<[u32; 4]>) -> Result<(), Error> {
        self.also_filtered = addrs;
        self.sync_filter()
    }

    pub fn capacity(&self) -> u32 {
        self.info.len()
    }

    /// The id bound to `key`, if any.
    pub fn id_of(&self, key: &VipKey) -> Result<Option<u32>, Error> {
        match self.ids.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(err(VIPS_MAP)(e)),
        }
    }

    /// The state stored for id `id` (present or not).
    pub fn info(&self, id: u32) -> Result<VipInfo, Error> {
        self.info.get(&id, 0).map_err(err(VIP_INFO_MAP))
    }

    pub fn set_info(&mut self, id: u32, info: &VipInfo) -> Result<(), Error> {
        self.info.set(id, info, 0).map_err(err(VIP_INFO_MAP))
    }

    /// Routes `key` to id `id` (its state must already be written).
    pub fn bind(&mut self, key: &VipKey, id: u32) -> Result<(), Error> {
        self.ids.insert(key, id, 0).map_err(err(VIPS_MAP))?;
        self.sync_filter()
    }

    /// Stops routing `key`.
    pub fn unbind(&mut self, key: &VipKey) -> Result<(), Error> {
        match self.ids.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(err(VIPS_MAP)(e)),
        }
        self.sync_filter()
    }

    /// Every bound key and its id.
    pub fn list(&self) -> Result<Vec<(VipKey, u32)>, Error> {
        self.ids.iter().map(|r| r.map_err(err(VIPS_MAP))).collect()
    }

    /// Rewrites the pre-filter words and index entries that differ from what the bound keys
    /// give. A key removed from the hash leaves the index in this same call, before its id
    /// can be given to another VIP.
    fn sync_filter(&mut self) -> Result<(), Error> {
        let bound = self.list()?;
        let layout = index_layout(&bound);
        for (i, e) in layout.iter().enumerate() {
            if self.index_entries[i] != *e {
                self.index.set(i as u32, e, 0).map_err(err(VIP_INDEX_MAP))?;
                self.index_entries[i] = *e;
            }
        }
        let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
        let addrs = bound
            .iter()
            .map(|(k, _)| k.addr)
            .chain(self.also_filtered.iter().copied());
        for addr in addrs {
            let bit = vip_filter_bit(&addr);
            words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        for (i, w) in words.iter().enumerate() {
            if self.filter_words[i] != *w {
                self.filter
                    .set(i as u32, w, 0)
                    .map_err(err(VIP_FILTER_MAP))?;
            }
        }
        self.filter_words = words;
        Ok(())
    }
}

/// `LB_SLOTS`: two generations of M slots (backend id, previous backend id) per VIP id. Keeps
/// a copy of what it wrote so a publish only writes the slots that differ.
pub struct SlotTable {
    map: Array<MapData, Slot>,
    ring_size: u32,
    max_vips: u32,
    written: StdHashMap<(u32, u32), Vec<Slot>>,
}

impl SlotTable {
    pub fn new(map: Array<MapData, Slot>, ring_size: u32, max_vips: u32) -> Self {
        SlotTable {
            map,
            ring_size,
            max_vips,
            written: StdHashMap::new(),
        }
    }

    pub fn ring_size(&self) -> u32 {
        self.ring_size
    }

    /// Writes `slots` (exactly M, or empty for "no backend") into generation `generation` of
    /// VIP `vip_id`. The generation must not be the live one.
    pub fn write(&mut self, vip_id: u32, generation: u32, slots: &[Slot]) -> Result<(), Error> {
        if vip_id >= self.max_vips {
            return Err(Error::Kernel(format!(
                "VIP id {vip_id} is beyond the {} VIPs the maps were sized for",
                self.max_vips
            )));
        }
        if slots.is_empty() {
            return Ok(());
        }
        if slots.len() != self.ring_size as usize {
            return Err(Error::Invalid(format!(
                "slot table has {} entries, the data plane was loaded with {}",
                slots.len(),
                self.ring_size
            )));
        }
        let prev = self.written.remove(&(vip_id, generation));
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (slot, v) in slots.iter().enumerate() {
            if prev.as_ref().is_some_and(|p| p[slot] == *v) {
                continue;
            }
            keys.push(slot_index(vip_id, generation, self.ring_size, slot as u32));
            values.push(*v);
        }
        let fd = self.map.map().fd().as_fd();
        if let Err(e) = super::batch::update(fd, &keys, &values) {
            // Kernels without batch updates for arrays (< 5.6): one syscall per slot.
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOTSUP) {
                return Err(Error::Io {
                    what: format!("writing {SLOTS_MAP}"),
                    source: e,
                });
            }
            for (k, v) in keys.iter().zip(&values) {
                self.map.set(*k, v, 0).map_err(err(SLOTS_MAP))?;
            }
        }
        self.written.insert((vip_id, generation), slots.to_vec());
        Ok(())
    }

    /// One slot.
    pub fn get(&self, vip_id: u32, generation: u32, slot: u32) -> Result<Slot, Error> {
        self.map
            .get(&slot_index(vip_id, generation, self.ring_size, slot), 0)
            .map_err(err(SLOTS_MAP))
    }

    /// Forgets what was written for `vip_id` (its id is being released).
    pub fn forget(&mut self, vip_id: u32) {
        self.written.remove(&(vip_id, 0));
        self.written.remove(&(vip_id, 1));
    }
}

/// `LB_BACKENDS`: backend id -> where to send.
pub struct BackendTable {
    map: Array<MapData, Backend>,
}

impl BackendTable {
    pub fn new(map: Array<MapData, Backend>) -> Self {
        BackendTable { map }
    }

    pub fn capacity(&self) -> u32 {
        self.map.len()
    }

    pub fn get(&self, id: u32) -> Result<Backend, Error> {
        self.map.get(&id, 0).map_err(err(BACKENDS_MAP))
    }

    /// Stores `backend` under `id`, marked present.
    pub fn set(&mut self, id: u32, backend: &Backend) -> Result<(), Error> {
        let b = Backend {
            flags: backend.flags | BACKEND_F_PRESENT,
            ..*backend
        };
        self.map.set(id, b, 0).map_err(err(BACKENDS_MAP))
    }

    /// Marks `id` absent: flows remembered on it will be placed again. The generation is kept
    /// so the next backend given this id gets a higher one.
    pub fn clear(&mut self, id: u32) -> Result<(), Error> {
        let old = self.get(id)?;
        let b = Backend {
            generation: old.generation,
            ..Backend::default()
        };
        self.map.set(id, b, 0).map_err(err(BACKENDS_MAP))
    }
}

/// The flow tables: established (`LB_FLOWS` or `LB_FLOWS_PERCPU`, as loaded; same layout),
/// probation (`LB_FLOWS_NEW`) and the per-CPU flow cache (`LB_FLOW_CACHE`, a region per CPU).
pub struct FlowTable {
    /// Keyed by [`TableKey`], made with `seed`.
    map: HashMap<MapData, TableKey, FlowValue>,
    /// The node's hash seed (`--hash-seed`), which IPv6 table keys are fingerprinted with.
    seed: u64,
    probation: Array<MapData, ProbationSlot>,
    cache: Array<MapData, FlowCacheSlot>,
    /// Slots per CPU of the cache in use (0: none).
    cache_slots: u32,
}

fn lookup(
    map: &HashMap<MapData, TableKey, FlowValue>,
    key: &TableKey,
    name: &'static str,
) -> Result<Option<FlowValue>, Error> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(err(name)(e)),
    }
}

impl FlowTable {
    pub fn new(
        map: HashMap<MapData, TableKey, FlowValue>,
        seed: u64,
        probation: Array<MapData, ProbationSlot>,
        cache: Array<MapData, FlowCacheSlot>,
        cache_slots: u32,
    ) -> Self {
        FlowTable {
            map,
            seed,
            probation,
            cache,
            cache_slots,
        }
    }

    /// The CPUs whose flow cache holds `key`, with the entry as filled (its `last_seen` is the
    /// cache tick the slot serves in, `lb_common::cache_tick`; stale slots included). Empty
    /// without a cache.
    pub fn cached(&self, key: &FlowKey) -> Result<Vec<(u32, FlowValue)>, Error> {
        if self.cache_slots == 0 {
            return Ok(Vec::new());
        }
        let cpus = self.cache.len() / self.cache_slots;
        let mut found = Vec::new();
        for cpu in 0..cpus {
            let i = flow_cache_index(cpu, key, self.cache_slots);
            let slot = self.cache.get(&i, 0).map_err(err(FLOW_CACHE_MAP))?;
            if slot.key == *key {
                found.push((cpu, slot.value));
            }
        }
        Ok(found)
    }

    /// The established entry of `key`.
    pub fn get(&self, key: &FlowKey) -> Result<Option<FlowValue>, Error> {
        lookup(&self.map, &TableKey::of(key, self.seed), FLOWS_MAP)
    }

    /// The probation entry of `key` (a flow seen once): its slot holds this key, whole, by
    /// the program's own rule.
    pub fn probation(&self, key: &FlowKey) -> Result<Option<FlowValue>, Error> {
        let h = probation_hash(key);
        let slot = self
            .probation
            .get(&probation_slot(h, self.probation.len()), 0)
            .map_err(err(FLOWS_NEW_MAP))?;
        Ok(
            (slot.key == *key && slot.check == probation_check(h, &slot.value))
                .then_some(slot.value),
        )
    }
}

#[cfg(test)]
mod index_tests {
    use lb_common::{VIP_INDEX_PROBES, VIP_INDEX_SLOTS, VipKey, vip_index_slot};

    use super::index_layout;

    fn key(i: u32) -> VipKey {
        VipKey {
            addr: [
                u32::from_ne_bytes([10, 0, (i >> 8) as u8, i as u8]),
                0,
                0,
                0,
            ],
            port: 80u16.to_be(),
            proto: 6,
            family: 4,
        }
    }

    #[test]
    fn every_key_is_within_its_probes_and_the_layout_ignores_order() {
        let bound: Vec<_> = (0..64).map(|i| (key(i), i)).collect();
        let layout = index_layout(&bound);
        for (k, id) in &bound {
            let first = vip_index_slot(k);
            let found = (0..VIP_INDEX_PROBES)
                .map(|i| layout[((first + i) & (VIP_INDEX_SLOTS - 1)) as usize])
                .find(|e| e.key == *k);
            assert_eq!(found.map(|e| e.id), Some(*id));
        }
        let mut reversed = bound.clone();
        reversed.reverse();
        assert_eq!(index_layout(&reversed), layout);
    }

    #[test]
    fn keys_beyond_a_full_neighbourhood_stay_out() {
        // More keys than entries: the extra ones are simply absent (the hash still has them).
        let bound: Vec<_> = (0..VIP_INDEX_SLOTS + 100).map(|i| (key(i), i)).collect();
        let layout = index_layout(&bound);
        let held = layout.iter().filter(|e| e.key.family != 0).count();
        assert!(held <= VIP_INDEX_SLOTS as usize);
        assert!(held > VIP_INDEX_SLOTS as usize / 2);
    }
}
