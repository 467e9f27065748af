//! Typed views of the per-CPU counters, summed over CPUs.
use std::collections::BTreeMap;

use aya::maps::{MapData, PerCpuArray};
use lb_common::{
    BACKEND_STATS_MAP, Counter, FLOW_STATS_MAP, FlowEvent, HC_STATS_MAP, HcStat, STATS_CACHE_HITS,
    STATS_MAP, Stat, VIP_STATS_MAP, VipCounter,
};
use serde::Serialize;

use crate::Error;

/// Totals per [`Stat`], per [`FlowEvent`] and per [`HcStat`] (packets only) summed over all
/// CPUs, keyed by their stable names (which never collide: flow events start with `flow_`,
/// health-check encapsulation counters with `hc_`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct GlobalStats(pub BTreeMap<&'static str, Counter>);

impl GlobalStats {
    pub fn get(&self, stat: Stat) -> Counter {
        self.0.get(stat.name()).copied().unwrap_or_default()
    }

    /// How many times `event` happened.
    pub fn flow(&self, event: FlowEvent) -> u64 {
        self.0.get(event.name()).map_or(0, |c| c.packets)
    }
}

/// The counter maps.
pub struct StatsMaps {
    pub global: PerCpuArray<MapData, Counter>,
    pub flows: PerCpuArray<MapData, u64>,
    /// Health-check encapsulation counters (tc program).
    pub hc: PerCpuArray<MapData, u64>,
    pub vips: PerCpuArray<MapData, VipCounter>,
    pub backends: PerCpuArray<MapData, Counter>,
    /// Packets the guard dropped per VIP id.
    pub vip_guard: PerCpuArray<MapData, u64>,
    /// The guard's sampled drops (`lb_common::TOP_SOURCES_MAP`).
    pub top: aya::maps::HashMap<MapData, lb_common::TopKey, u64>,
}

/// Adds the express lane's forwarded cache hits (`lb_common::STATS_CACHE_HITS`, counted once
/// for two counters) to `forwarded` and `flow_hit`.
fn fold_cache_hits(out: &mut GlobalStats, hits: Counter) {
    let forwarded = out.0.entry(Stat::Forwarded.name()).or_default();
    *forwarded = add(*forwarded, &hits);
    out.0.entry(FlowEvent::Hit.name()).or_default().packets += hits.packets;
}

fn add(a: Counter, b: &Counter) -> Counter {
    Counter {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    }
}

/// A second handle on the per-CPU array `map` (a duplicated fd: the same kernel map), so
/// readers can hold their own copy outside the agent's lock.
fn reopen<V: aya::Pod>(
    map: &PerCpuArray<MapData, V>,
    name: &'static str,
) -> Result<PerCpuArray<MapData, V>, Error> {
    use aya::maps::IterableMap as _;
    let data = super::rawmap::dup(map.map(), name)?;
    PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(|source| Error::Map { name, source })
}

/// A second handle on the top sources' map (as [`reopen`]).
fn reopen_top(
    map: &aya::maps::HashMap<MapData, lb_common::TopKey, u64>,
) -> Result<aya::maps::HashMap<MapData, lb_common::TopKey, u64>, Error> {
    use aya::maps::IterableMap as _;
    let name = lb_common::TOP_SOURCES_MAP;
    let data = super::rawmap::dup(map.map(), name)?;
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
        .map_err(|source| Error::Map { name, source })
}

impl StatsMaps {
    /// Read handles on the same maps (the writer keeps the originals to zero entries).
    pub fn reader(&self) -> Result<StatsMaps, Error> {
        Ok(StatsMaps {
            global: reopen(&self.global, STATS_MAP)?,
            flows: reopen(&self.flows, FLOW_STATS_MAP)?,
            hc: reopen(&self.hc, HC_STATS_MAP)?,
            vips: reopen(&self.vips, VIP_STATS_MAP)?,
            backends: reopen(&self.backends, BACKEND_STATS_MAP)?,
            vip_guard: reopen(&self.vip_guard, lb_common::VIP_GUARD_STATS_MAP)?,
            top: reopen_top(&self.top)?,
        })
    }

    /// Every entry of the sampled guard drops, and the program's clock (monotonic coarse
    /// nanoseconds) right after: a walk of the whole map, one syscall or two per entry.
    pub fn top_sources(&self) -> Result<(Vec<(lb_common::TopKey, u64)>, u64), Error> {
        let name = lb_common::TOP_SOURCES_MAP;
        let mut out = Vec::new();
        for entry in self.top.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                // An entry the LRU evicted between its key and its value: gone, skip it.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(Error::Map { name, source }),
            }
        }
        Ok((out, crate::clock::coarse_now_ns()))
    }

    /// Packets the guard dropped for VIP id `id`, summed over CPUs.
    pub fn vip_guard_dropped(&self, id: u32) -> Result<u64, Error> {
        let per_cpu = self.vip_guard.get(&id, 0).map_err(|source| Error::Map {
            name: lb_common::VIP_GUARD_STATS_MAP,
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    /// Entry `index` of the global counters, summed over CPUs.
    fn global_entry(&self, index: u32) -> Result<Counter, Error> {
        let per_cpu = self.global.get(&index, 0).map_err(|source| Error::Map {
            name: STATS_MAP,
            source,
        })?;
        Ok(per_cpu.iter().fold(Counter::default(), add))
    }

    /// Reads every global counter and sums it over CPUs.
    pub fn global(&self) -> Result<GlobalStats, Error> {
        let mut out = GlobalStats::default();
        for stat in Stat::ALL {
            out.0.insert(stat.name(), self.global_entry(stat as u32)?);
        }
        let events = FlowEvent::ALL.map(|e| (e as u32, e.name()));
        let hc = HcStat::ALL.map(|e| (e as u32, e.name()));
        for (map, name, list) in [
            (&self.flows, FLOW_STATS_MAP, &events[..]),
            (&self.hc, HC_STATS_MAP, &hc[..]),
        ] {
            for (index, key) in list {
                let per_cpu = map
                    .get(index, 0)
                    .map_err(|source| Error::Map { name, source })?;
                let packets = per_cpu.iter().sum();
                out.0.insert(key, Counter { packets, bytes: 0 });
            }
        }
        fold_cache_hits(&mut out, self.global_entry(STATS_CACHE_HITS)?);
        Ok(out)
    }

    /// Counters of VIP id `id`, summed over CPUs.
    pub fn vip(&self, id: u32) -> Result<VipCounter, Error> {
        let per_cpu = self.vips.get(&id, 0).map_err(|source| Error::Map {
            name: VIP_STATS_MAP,
            source,
        })?;
        Ok(per_cpu
            .iter()
            .fold(VipCounter::default(), |a, b| VipCounter {
                packets: a.packets + b.packets,
                bytes: a.bytes + b.bytes,
                new_flows: a.new_flows + b.new_flows,
            }))
    }

    /// Counters of backend id `id`, summed over CPUs.
    pub fn backend(&self, id: u32) -> Result<Counter, Error> {
        let per_cpu = self.backends.get(&id, 0).map_err(|source| Error::Map {
            name: BACKEND_STATS_MAP,
            source,
        })?;
        Ok(per_cpu.iter().fold(Counter::default(), add))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_hits_count_as_forwarded_packets_and_flow_hits() {
        let mut out = GlobalStats::default();
        out.0.insert(
            Stat::Forwarded.name(),
            Counter {
                packets: 3,
                bytes: 300,
            },
        );
        out.0.insert(
            FlowEvent::Hit.name(),
            Counter {
                packets: 2,
                bytes: 0,
            },
        );
        fold_cache_hits(
            &mut out,
            Counter {
                packets: 5,
                bytes: 640,
            },
        );
        assert_eq!(
            out.get(Stat::Forwarded),
            Counter {
                packets: 8,
                bytes: 940
            }
        );
        assert_eq!(out.flow(FlowEvent::Hit), 7);
        assert_eq!(out.get(Stat::DropMalformed), Counter::default());
    }
}
