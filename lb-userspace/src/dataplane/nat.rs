//! The NAT tables (`LB_NAT_FWD`, `LB_NAT_REV`, `LB_NAT_ADDRS`): the NAT source addresses the
//! program answers on, and the sweep that deletes expired connections (the program only
//! takes over an expired port when it needs one; the sweep keeps the tables from filling).
use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, NAT_ADDR_V4, NAT_ADDR_V6, NAT_ADDRS_MAP, NAT_FWD_MAP,
    NAT_POOL_LENS, NAT_POOL_MAX, NAT_REFUSALS, NAT_REFUSED_MAP, NAT_REFUSED_NO_PORT,
    NAT_REFUSED_TABLE_FULL, NAT_REV_MAP, NatEntry, NatPhase, NatTimes, nat_addr_index, nat_expired,
    nat_forward_key, nat_phase, nat_refused_index,
};

use crate::{
    Error,
    net::{addr_words, words_addr},
};

pub struct NatTables {
    pub fwd: HashMap<MapData, FlowKey, NatEntry>,
    pub rev: HashMap<MapData, FlowKey, NatEntry>,
    pub addrs: Array<MapData, [u32; 4]>,
    /// The timeouts the program was loaded with (the sweep applies the same).
    pub times: NatTimes,
    /// The refusals per pool slot (`LB_NAT_REFUSED`), zeroed where a start moves another
    /// address into a slot ([`NatTables::forget_moved_refusals`]).
    refused: PerCpuArray<MapData, u64>,
}

/// Handles of their own on both NAT tables, for a sweep that runs without the agent's lock
/// (a full table is 130,000 map reads).
pub struct NatSweeper {
    fwd: HashMap<MapData, FlowKey, NatEntry>,
    rev: HashMap<MapData, FlowKey, NatEntry>,
    /// The pool (`LB_NAT_ADDRS`) and its refusals per address (`LB_NAT_REFUSED`), for the
    /// per-address counts.
    addrs: Array<MapData, [u32; 4]>,
    refused: PerCpuArray<MapData, u64>,
    times: NatTimes,
    /// `--nat-entries` and the half-open slots, for what the sweep reports.
    pub capacity: u32,
    pub half_slots: u32,
}

impl NatSweeper {
    /// See [`sweep`].
    pub fn sweep(&mut self, now_s: u32) -> Result<Sweep, Error> {
        let mut out = sweep(&mut self.fwd, &mut self.rev, now_s, &self.times)?;
        self.count_refused(&mut out);
        Ok(out)
    }

    /// Adds each pool address's refusals (summed over CPUs) to `out.by_addr`.
    fn count_refused(&self, out: &mut Sweep) {
        for (f, fam) in [(NAT_ADDR_V4, FAMILY_V4), (NAT_ADDR_V6, FAMILY_V6)] {
            for i in 0..NAT_POOL_MAX {
                let at = nat_addr_index(f, i);
                let w = match self.addrs.get(&at, 0) {
                    Ok(w) if w != [0; 4] => w,
                    _ => break,
                };
                let sum = |reason| {
                    self.refused
                        .get(&nat_refused_index(at, reason), 0)
                        .map_or(0, |v| v.iter().sum::<u64>())
                };
                let (no_port, full) = (sum(NAT_REFUSED_NO_PORT), sum(NAT_REFUSED_TABLE_FULL));
                if no_port + full > 0 {
                    let per = out.by_addr.entry(words_addr(w, fam)).or_default();
                    per.refused_no_port = no_port;
                    per.refused_table_full = full;
                }
            }
        }
    }
}

/// A second handle on map `m` (a duplicated fd), as `T`.
fn dup<T: TryFrom<Map, Error = aya::maps::MapError>>(
    m: &Map,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<T, Error> {
    let (Map::HashMap(data) | Map::Array(data) | Map::PerCpuArray(data)) = m else {
        return Err(Error::Kernel(format!("map {name} is not of its kind")));
    };
    let data = super::rawmap::dup(data, name)?;
    T::try_from(wrap(data)).map_err(err(name))
}

/// The NAT maps taken from the loaded object: the tables and the sweeper's own handles.
pub fn from_maps(
    fwd: Map,
    rev: Map,
    addrs: Map,
    refused: Map,
    opts: &super::LoadOptions,
) -> Result<(NatTables, NatSweeper), Error> {
    let times = opts.config().nat_times();
    let sweeper = NatSweeper {
        fwd: dup(&fwd, NAT_FWD_MAP, Map::HashMap)?,
        rev: dup(&rev, NAT_REV_MAP, Map::HashMap)?,
        addrs: dup(&addrs, NAT_ADDRS_MAP, Map::Array)?,
        refused: dup(&refused, NAT_REFUSED_MAP, Map::PerCpuArray)?,
        times,
        capacity: opts.nat_entries,
        half_slots: opts.nat_half_slots(),
    };
    let tables = NatTables {
        fwd: HashMap::try_from(fwd).map_err(err(NAT_FWD_MAP))?,
        rev: HashMap::try_from(rev).map_err(err(NAT_REV_MAP))?,
        addrs: Array::try_from(addrs).map_err(err(NAT_ADDRS_MAP))?,
        times,
        refused: PerCpuArray::try_from(refused).map_err(err(NAT_REFUSED_MAP))?,
    };
    Ok((tables, sweeper))
}

fn err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// What a sweep found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Connections (reverse entries) still live, ...
    pub live: usize,
    /// ... of which half-open (TCP before the client's handshake ACK, UDP before an answer),
    pub half_open: usize,
    /// ... and closed, still holding their port.
    pub closing: usize,
    /// Connections deleted.
    pub expired: usize,
    /// The live ones per NAT address (the reverse entry's destination), as `live`,
    /// `half_open` and `closing` count them.
    pub by_addr: BTreeMap<IpAddr, PoolCount>,
}

/// One NAT address's share of a [`Sweep`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolCount {
    pub live: usize,
    pub half_open: usize,
    pub closing: usize,
    /// Ports in use toward each backend (address and port): its live connections.
    pub by_backend: BTreeMap<std::net::SocketAddr, usize>,
    /// New connections refused on this address since the program was loaded: no free port
    /// toward the backend, the tables full (`LB_NAT_REFUSED`, read by the sweeper).
    pub refused_no_port: u64,
    pub refused_table_full: u64,
}

impl NatTables {
    /// The NAT address pool the map holds: each family's addresses up to its first empty
    /// entry, IPv4 first.
    pub fn pool(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (f, fam) in [(NAT_ADDR_V4, FAMILY_V4), (NAT_ADDR_V6, FAMILY_V6)] {
            for i in 0..NAT_POOL_MAX {
                match self.addrs.get(&nat_addr_index(f, i), 0) {
                    Ok(w) if w != [0; 4] => out.push(words_addr(w, fam)),
                    _ => break,
                }
            }
        }
        out
    }

    /// The pool's addresses as the map holds them (network-order words).
    pub fn pinned_addrs(&self) -> Vec<[u32; 4]> {
        self.pool().into_iter().map(addr_words).collect()
    }

    /// Writes the NAT address pool (`crate::nat_pool`; empty: none), each family's in order
    /// and the rest of the map zeroed. From the last entry down: the program reads a
    /// family's pool up to its first empty entry, so a growing pool appears whole.
    pub fn set_pool(&mut self, pool: &[IpAddr]) -> Result<(), Error> {
        let lens = |v4: bool| pool.iter().filter(|a| a.is_ipv4() == v4).count() as u32;
        let lens = [lens(true), lens(false), 0, 0];
        if lens[0].max(lens[1]) > NAT_POOL_MAX {
            return Err(Error::Invalid(format!(
                "{} NAT source addresses of one family: at most {NAT_POOL_MAX}",
                lens[0].max(lens[1])
            )));
        }
        // A shrinking pool's size goes first, a growing one's last: the program picks among
        // the first `size` addresses, which are then always written.
        let old = self.addrs.get(&NAT_POOL_LENS, 0).unwrap_or([0; 4]);
        let shrunk = [old[0].min(lens[0]), old[1].min(lens[1]), 0, 0];
        self.addrs
            .set(NAT_POOL_LENS, shrunk, 0)
            .map_err(err(NAT_ADDRS_MAP))?;
        let layout = pool_layout(pool);
        for f in [NAT_ADDR_V4, NAT_ADDR_V6] {
            for i in (0..NAT_POOL_MAX).rev() {
                let at = nat_addr_index(f, i);
                self.addrs
                    .set(at, layout[at as usize], 0)
                    .map_err(err(NAT_ADDRS_MAP))?;
            }
        }
        self.addrs
            .set(NAT_POOL_LENS, lens, 0)
            .map_err(err(NAT_ADDRS_MAP))
    }

    /// The pool slots as the map holds them now, by [`nat_addr_index`] (empty ones zero).
    pub fn slots(&self) -> Vec<[u32; 4]> {
        (0..NAT_POOL_LENS)
            .map(|at| self.addrs.get(&at, 0).unwrap_or([0; 4]))
            .collect()
    }

    /// Zeroes the refusal counts of the slots whose address in `pool`'s layout differs from
    /// `before` (the slots as pinned when this run started; [`moved_slots`]): the counts are
    /// per slot, so without this a pool changed across a restart would show the previous
    /// address's refusals under whichever address now occupies its slot. Called once the
    /// new pool (or none) is written, so a refusal the program counts meanwhile is lost
    /// rather than shown under the wrong address. Returns the slots zeroed.
    pub fn forget_moved_refusals(
        &mut self,
        before: &[[u32; 4]],
        pool: &[IpAddr],
    ) -> Result<Vec<u32>, Error> {
        let moved = moved_slots(before, &pool_layout(pool));
        if moved.is_empty() {
            return Ok(moved);
        }
        let n = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs")(e))?;
        for &at in &moved {
            for reason in 0..NAT_REFUSALS {
                let zeros = PerCpuValues::try_from(vec![0u64; n])
                    .map_err(Error::io("building per-CPU zeros"))?;
                self.refused
                    .set(nat_refused_index(at, reason), zeros, 0)
                    .map_err(err(NAT_REFUSED_MAP))?;
            }
        }
        Ok(moved)
    }

    /// See [`sweep`].
    pub fn sweep(&mut self, now_s: u32) -> Result<Sweep, Error> {
        sweep(&mut self.fwd, &mut self.rev, now_s, &self.times)
    }
}

/// The pool slots [`NatTables::set_pool`] writes for `pool`, by [`nat_addr_index`]: each
/// family's addresses in order from its first slot, the rest zero (addresses beyond
/// [`NAT_POOL_MAX`] of a family, which `set_pool` refuses, left out).
pub fn pool_layout(pool: &[IpAddr]) -> Vec<[u32; 4]> {
    let mut out = vec![[0; 4]; NAT_POOL_LENS as usize];
    for (f, v4) in [(NAT_ADDR_V4, true), (NAT_ADDR_V6, false)] {
        let mine = pool.iter().filter(|a| a.is_ipv4() == v4);
        for (i, a) in (0..NAT_POOL_MAX).zip(mine) {
            out[nat_addr_index(f, i) as usize] = addr_words(*a);
        }
    }
    out
}

/// The slots (by [`nat_addr_index`]) whose address differs between the layouts `before` and
/// `after`, an empty slot counting as an address: a slot keeps its refusal counts only while
/// it holds the same address.
pub fn moved_slots(before: &[[u32; 4]], after: &[[u32; 4]]) -> Vec<u32> {
    (0..NAT_POOL_LENS)
        .filter(|&at| {
            let slot = |l: &[[u32; 4]]| l.get(at as usize).copied().unwrap_or([0; 4]);
            slot(before) != slot(after)
        })
        .collect()
}

/// Deletes every connection expired at `now_s` (both entries; a forward entry only while it
/// still names the same port, as the program does).
fn sweep(
    fwd_map: &mut HashMap<MapData, FlowKey, NatEntry>,
    rev_map: &mut HashMap<MapData, FlowKey, NatEntry>,
    now_s: u32,
    times: &NatTimes,
) -> Result<Sweep, Error> {
    let mut out = Sweep::default();
    let mut dead = Vec::new();
    for r in rev_map.iter() {
        let (key, rev) = r.map_err(err(NAT_REV_MAP))?;
        let fkey = nat_forward_key(&rev, key.proto, key.family);
        let fwd = fwd_map.get(&fkey, 0).ok().filter(|f| {
            f.src == key.dst && f.sport == key.dport && f.dst == key.src && f.dport == key.sport
        });
        if nat_expired(key.proto, fwd.as_ref(), Some(&rev), now_s, times) {
            dead.push((key, fwd.map(|_| fkey)));
        } else {
            out.live += 1;
            let per = out
                .by_addr
                .entry(words_addr(key.dst, key.family))
                .or_default();
            per.live += 1;
            let backend =
                std::net::SocketAddr::new(words_addr(key.src, key.family), u16::from_be(key.sport));
            *per.by_backend.entry(backend).or_default() += 1;
            let flags = rev.flags | fwd.map_or(0, |f| f.flags);
            match nat_phase(key.proto, flags, rev.idle_s, times).0 {
                NatPhase::HalfOpen => {
                    out.half_open += 1;
                    per.half_open += 1;
                }
                NatPhase::Closing => {
                    out.closing += 1;
                    per.closing += 1;
                }
                NatPhase::Established => {}
            }
        }
    }
    for (key, fkey) in dead {
        if let Some(f) = fkey {
            // Gone already (the program took the port over) is fine.
            let _ = fwd_map.remove(&f);
        }
        let _ = rev_map.remove(&key);
        out.expired += 1;
    }
    // Forward entries whose reverse entry is gone (the program placed the tuple again on
    // another port, then that one expired) are swept when their own time is up.
    let mut orphans = Vec::new();
    for r in fwd_map.iter() {
        let (key, fwd) = r.map_err(err(NAT_FWD_MAP))?;
        let (rkey, _) = lb_common::nat_reverse(&key, &fwd);
        if rev_map.get(&rkey, 0).is_err() && nat_expired(key.proto, Some(&fwd), None, now_s, times)
        {
            orphans.push(key);
        }
    }
    for k in orphans {
        let _ = fwd_map.remove(&k);
    }
    Ok(out)
}

/// The non-empty addresses of an `LB_NAT_ADDRS` map pinned at `pin` by a previous ABI (one
/// address per family, no sizes entry), for the pre-filter a migration keeps; none if it
/// cannot be read (the agent then writes its own pool as on a fresh start).
pub fn addrs_pinned_at(pin: &std::path::Path) -> Vec<[u32; 4]> {
    let Ok(data) = MapData::from_pin(pin) else {
        return Vec::new();
    };
    let Ok(old) = Array::<MapData, [u32; 4]>::try_from(Map::Array(data)) else {
        return Vec::new();
    };
    (0..old.len().min(NAT_POOL_LENS))
        .filter_map(|i| old.get(&i, 0).ok())
        .filter(|w| *w != [0; 4])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_layout_interleaves_the_families_in_order() {
        let l = pool_layout(&ips(&["10.0.0.1", "fd00::1", "10.0.0.2"]));
        assert_eq!(l.len(), NAT_POOL_LENS as usize);
        assert_eq!(
            l[nat_addr_index(NAT_ADDR_V4, 0) as usize],
            addr_words(ips(&["10.0.0.1"])[0])
        );
        assert_eq!(
            l[nat_addr_index(NAT_ADDR_V6, 0) as usize],
            addr_words(ips(&["fd00::1"])[0])
        );
        assert_eq!(
            l[nat_addr_index(NAT_ADDR_V4, 1) as usize],
            addr_words(ips(&["10.0.0.2"])[0])
        );
        assert_eq!(l.iter().filter(|w| **w != [0; 4]).count(), 3);
    }

    #[test]
    fn a_slot_keeps_its_counts_only_with_the_same_address() {
        let v4 = |i| nat_addr_index(NAT_ADDR_V4, i);
        let v6 = |i| nat_addr_index(NAT_ADDR_V6, i);
        let before = pool_layout(&ips(&["10.0.0.1", "10.0.0.2", "fd00::1"]));
        // The same pool: nothing moves.
        let same = pool_layout(&ips(&["10.0.0.1", "fd00::1", "10.0.0.2"]));
        assert_eq!(moved_slots(&before, &same), Vec::<u32>::new());
        // The same set in another order: both IPv4 slots changed hands.
        let swapped = pool_layout(&ips(&["10.0.0.2", "10.0.0.1", "fd00::1"]));
        assert_eq!(moved_slots(&before, &swapped), vec![v4(0), v4(1)]);
        // One address replaced: only its slot.
        let replaced = pool_layout(&ips(&["10.0.0.1", "10.0.0.9", "fd00::1"]));
        assert_eq!(moved_slots(&before, &replaced), vec![v4(1)]);
        // Shrunk and grown: the emptied and the newly filled slots.
        let other = pool_layout(&ips(&["10.0.0.1", "fd00::1", "fd00::2"]));
        assert_eq!(moved_slots(&before, &other), vec![v4(1), v6(1)]);
        // No pool before (a fresh start) or after: every slot that held or gets an address.
        assert_eq!(
            moved_slots(&pool_layout(&[]), &before),
            vec![v4(0), v6(0), v4(1)]
        );
        assert_eq!(
            moved_slots(&before, &pool_layout(&[])),
            vec![v4(0), v6(0), v4(1)]
        );
        // A short or missing `before` reads as empty slots.
        assert_eq!(moved_slots(&[], &pool_layout(&[])), Vec::<u32>::new());
    }
}
