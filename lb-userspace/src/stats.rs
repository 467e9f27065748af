//! Typed view of the global per-CPU counters.
use std::collections::BTreeMap;

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{Counter, STATS_MAP, Stat};
use serde::Serialize;

use crate::Error;

/// Totals per [`Stat`] summed over all CPUs, keyed by the stat's stable name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct GlobalStats(pub BTreeMap<&'static str, Counter>);

impl GlobalStats {
    pub fn get(&self, stat: Stat) -> Counter {
        self.0.get(stat.name()).copied().unwrap_or_default()
    }
}

/// Wrapper around the `LB_STATS` per-CPU array.
pub struct StatsMap<'a> {
    map: PerCpuArray<&'a MapData, Counter>,
}

impl<'a> StatsMap<'a> {
    pub fn new(map: &'a Map) -> Result<Self, Error> {
        let map = PerCpuArray::try_from(map).map_err(|source| Error::Map {
            name: STATS_MAP,
            source,
        })?;
        Ok(StatsMap { map })
    }

    /// Reads every counter and sums it over CPUs.
    pub fn read(&self) -> Result<GlobalStats, Error> {
        let mut out = GlobalStats::default();
        for stat in Stat::ALL {
            let per_cpu = self
                .map
                .get(&(stat as u32), 0)
                .map_err(|source| Error::Map {
                    name: STATS_MAP,
                    source,
                })?;
            let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            out.0.insert(stat.name(), total);
        }
        Ok(out)
    }
}
