//! The NAT tables (`LB_NAT_FWD`, `LB_NAT_REV`, `LB_NAT_ADDRS`): the NAT source addresses the
//! program answers on, and the sweep that deletes expired connections (the program only
//! takes over an expired port when it needs one; the sweep keeps the tables from filling).
use std::os::fd::{AsFd as _, OwnedFd};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    FlowKey, NAT_ADDR_V4, NAT_ADDR_V6, NAT_ADDRS_MAP, NAT_FWD_MAP, NAT_REV_MAP, NatEntry, NatPhase,
    NatTimes, nat_expired, nat_forward_key, nat_phase,
};

use crate::Error;

pub struct NatTables {
    pub fwd: HashMap<MapData, FlowKey, NatEntry>,
    pub rev: HashMap<MapData, FlowKey, NatEntry>,
    pub addrs: Array<MapData, [u32; 4]>,
    /// The timeouts the program was loaded with (the sweep applies the same).
    pub times: NatTimes,
}

/// Handles of their own on both NAT tables, for a sweep that runs without the agent's lock
/// (a full table is 130,000 map reads).
pub struct NatSweeper {
    fwd: HashMap<MapData, FlowKey, NatEntry>,
    rev: HashMap<MapData, FlowKey, NatEntry>,
    times: NatTimes,
    /// `--nat-entries` and the half-open slots, for what the sweep reports.
    pub capacity: u32,
    pub half_slots: u32,
}

impl NatSweeper {
    /// See [`sweep`].
    pub fn sweep(&mut self, now_s: u32) -> Result<Sweep, Error> {
        sweep(&mut self.fwd, &mut self.rev, now_s, &self.times)
    }
}

/// A second handle on hash map `m` (a duplicated fd).
fn dup(m: &Map, name: &'static str) -> Result<HashMap<MapData, FlowKey, NatEntry>, Error> {
    let Map::HashMap(data) = m else {
        return Err(Error::Kernel(format!("map {name} is not a hash map")));
    };
    let fd: OwnedFd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(Error::io("duplicating a NAT map's fd"))?;
    let data = MapData::from_fd(fd).map_err(err(name))?;
    HashMap::try_from(Map::HashMap(data)).map_err(err(name))
}

/// The NAT maps taken from the loaded object: the tables and the sweeper's own handles.
pub fn from_maps(
    fwd: Map,
    rev: Map,
    addrs: Map,
    opts: &super::LoadOptions,
) -> Result<(NatTables, NatSweeper), Error> {
    let times = opts.config().nat_times();
    let sweeper = NatSweeper {
        fwd: dup(&fwd, NAT_FWD_MAP)?,
        rev: dup(&rev, NAT_REV_MAP)?,
        times,
        capacity: opts.nat_entries,
        half_slots: opts.nat_half_slots(),
    };
    let tables = NatTables {
        fwd: HashMap::try_from(fwd).map_err(err(NAT_FWD_MAP))?,
        rev: HashMap::try_from(rev).map_err(err(NAT_REV_MAP))?,
        addrs: Array::try_from(addrs).map_err(err(NAT_ADDRS_MAP))?,
        times,
    };
    Ok((tables, sweeper))
}

fn err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// What a sweep found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Connections (reverse entries) still live, ...
    pub live: usize,
    /// ... of which half-open (TCP before the client's handshake ACK, UDP before an answer),
    pub half_open: usize,
    /// ... and closed, still holding their port.
    pub closing: usize,
    /// Connections deleted.
    pub expired: usize,
}

impl NatTables {
    /// The NAT source addresses the maps hold (both words; all zero: none).
    pub fn addrs(&self) -> ([u32; 4], [u32; 4]) {
        let get = |i| self.addrs.get(&i, 0).unwrap_or([0; 4]);
        (get(NAT_ADDR_V4), get(NAT_ADDR_V6))
    }

    /// The ones that are set.
    pub fn pinned_addrs(&self) -> Vec<[u32; 4]> {
        let (v4, v6) = self.addrs();
        [v4, v6].into_iter().filter(|a| *a != [0; 4]).collect()
    }

    /// Sets the NAT source addresses (network-order words; all zero: none).
    pub fn set_addrs(&mut self, v4: [u32; 4], v6: [u32; 4]) -> Result<(), Error> {
        self.addrs
            .set(NAT_ADDR_V4, v4, 0)
            .map_err(err(NAT_ADDRS_MAP))?;
        self.addrs
            .set(NAT_ADDR_V6, v6, 0)
            .map_err(err(NAT_ADDRS_MAP))
    }

    /// See [`sweep`].
    pub fn sweep(&mut self, now_s: u32) -> Result<Sweep, Error> {
        sweep(&mut self.fwd, &mut self.rev, now_s, &self.times)
    }
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
        let fwd = fwd_map
            .get(&fkey, 0)
            .ok()
            .filter(|f| f.sport == key.dport && f.dst == key.src && f.dport == key.sport);
        if nat_expired(key.proto, fwd.as_ref(), Some(&rev), now_s, times) {
            dead.push((key, fwd.map(|_| fkey)));
        } else {
            out.live += 1;
            let flags = rev.flags | fwd.map_or(0, |f| f.flags);
            match nat_phase(key.proto, flags, rev.idle_s, times).0 {
                NatPhase::HalfOpen => out.half_open += 1,
                NatPhase::Closing => out.closing += 1,
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
