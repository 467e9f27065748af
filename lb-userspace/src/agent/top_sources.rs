//! `lb stats --top-sources`: the kernel's sampled guard drops (`lb_common::top_sources`)
//! summed over the last minute's steps and the CPUs, by source.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{
    FAMILY_V4, Stat, TOP_SAMPLE_EVERY, TOP_STEP_NS, TOP_WINDOW_STEPS, TopKey, top_in_window,
};

use crate::{
    Error,
    agent::Agent,
    protocol::{TopSource, TopSourcesView},
};

/// How many sources the view names.
pub const TOP_N: usize = 10;

/// The `n` sources with the most samples among `entries` (the map's keys and sample counts)
/// whose step is in the minute ending at step `now`, most first (ties by address, so the
/// answer is stable).
pub fn top_sources(entries: &[(TopKey, u64)], now: u32, n: usize) -> TopSourcesView {
    let mut by_source: BTreeMap<IpAddr, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
    for (k, samples) in entries {
        if !top_in_window(k.step, now) || *samples == 0 {
            continue;
        }
        let reason = Stat::ALL
            .get(k.reason as usize)
            .map_or_else(|| format!("reason_{}", k.reason), |s| s.name().to_string());
        let e = by_source.entry(source_of(k)).or_default();
        e.0 += samples;
        *e.1.entry(reason).or_default() += samples * u64::from(TOP_SAMPLE_EVERY);
    }
    let mut sources: Vec<TopSource> = by_source
        .into_iter()
        .map(|(source, (samples, reasons))| TopSource {
            source,
            dropped: samples * u64::from(TOP_SAMPLE_EVERY),
            samples,
            reasons,
        })
        .collect();
    sources.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.source.cmp(&b.source)));
    sources.truncate(n);
    TopSourcesView {
        window_s: u64::from(TOP_WINDOW_STEPS) * TOP_STEP_NS / 1_000_000_000,
        sample_every: TOP_SAMPLE_EVERY,
        sources,
    }
}

/// The address of a key (its words are in network order, as the packet's).
fn source_of(k: &TopKey) -> IpAddr {
    let bytes = |w: &[u32]| -> Vec<u8> { w.iter().flat_map(|x| x.to_ne_bytes()).collect() };
    if k.family == FAMILY_V4 {
        let b = bytes(&k.addr[..1]);
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        let b: [u8; 16] = bytes(&k.addr).try_into().unwrap_or([0; 16]);
        IpAddr::V6(Ipv6Addr::from(b))
    }
}

impl Agent {
    /// The ten sources the guard dropped most in the last minute. The map is read with no
    /// lock held (a walk of up to `TOP_SOURCES_ENTRIES` keys): call it from a blocking thread.
    pub fn top_sources(&self) -> Result<TopSourcesView, Error> {
        let maps = {
            let core = self.core();
            core.kernel()
                .counters()
                .ok_or_else(|| Error::Unavailable("no counter maps".into()))?
        };
        let (entries, now_ns) = maps.top_sources()?;
        Ok(top_sources(&entries, lb_common::top_step(now_ns), TOP_N))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: [u8; 4], reason: Stat, cpu: u16, step: u32) -> TopKey {
        TopKey {
            addr: [u32::from_ne_bytes(addr), 0, 0, 0],
            family: FAMILY_V4,
            reason: reason as u8,
            cpu,
            step,
        }
    }

    #[test]
    fn sums_cpus_steps_and_reasons_within_the_minute_only() {
        let now = 1000;
        let a = [192, 0, 2, 7];
        let b = [198, 51, 100, 9];
        let entries = vec![
            (key(a, Stat::DropSourceDenied, 0, now), 3),
            (key(a, Stat::DropSourceDenied, 1, now - 5), 2),
            (key(a, Stat::DropSourceRate, 0, now), 1),
            (key(a, Stat::DropSourceDenied, 0, now - 6), 100),
            (key(b, Stat::DropVipRate, 1, now - 1), 4),
        ];
        let v = top_sources(&entries, now, TOP_N);
        assert_eq!(v.window_s, 60);
        assert_eq!(v.sources.len(), 2);
        let first = &v.sources[0];
        assert_eq!(first.source, "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_eq!(first.samples, 6, "the step a minute old is left out");
        assert_eq!(first.dropped, 6 * u64::from(TOP_SAMPLE_EVERY));
        assert_eq!(first.reasons["dropped_source_denied"], 5 * 16);
        assert_eq!(first.reasons["dropped_source_rate"], 16);
        assert_eq!(
            v.sources[1].source,
            "198.51.100.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(v.sources[1].samples, 4);
    }

    #[test]
    fn keeps_the_n_most_and_reads_ipv6() {
        let mut entries: Vec<(TopKey, u64)> = (0..20u8)
            .map(|i| {
                (
                    key([10, 0, 0, i], Stat::DropSourceDenied, 0, 7),
                    u64::from(i) + 1,
                )
            })
            .collect();
        let v6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let o = v6.octets();
        let words: Vec<u32> = o
            .chunks(4)
            .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        entries.push((
            TopKey {
                addr: words.try_into().unwrap(),
                family: lb_common::FAMILY_V6,
                reason: Stat::DropSourceNotAllowed as u8,
                cpu: 0,
                step: 7,
            },
            50,
        ));
        let v = top_sources(&entries, 7, TOP_N);
        assert_eq!(v.sources.len(), TOP_N);
        assert_eq!(v.sources[0].source, IpAddr::V6(v6));
        assert_eq!(v.sources[1].source, "10.0.0.19".parse::<IpAddr>().unwrap());
        assert_eq!(v.sources[9].samples, 12);
    }
}
