//! Upgrading a pinned set of the previous map ABI in place, so an upgrade keeps every flow,
//! NAT connection and counter. The rules per map come from `lb_common::migrate` (reused,
//! copied, converted, grown, new, removed); this module plans them against the pins
//! ([`plan`], also what `lb upgrade --check` prints) and carries them out ([`copy`], then
//! [`commit`]) around the program swap that `lb run` does through the pinned bpf_link:
//!
//! 1. the new object is loaded with every reused map adopted from its pin and every other
//!    map created under a staging directory beside the pins (`next/`): the old program runs
//!    on, untouched;
//! 2. first copy: every entry of the old maps into the new ones (nothing else writes them
//!    yet); a failure here removes the staged maps and leaves the old set as it was;
//! 3. the links swap to the new programs (one `BPF_LINK_UPDATE` each: no moment without a
//!    program); from then on only the new program writes;
//! 4. second copy, the difference: what the old program wrote between the first copy and the
//!    swap. An entry the old program added is inserted unless the new program made its own;
//!    one it changed is updated only where the new map still holds what the first copy
//!    wrote; counters get what the old program counted meanwhile added to them;
//! 5. commit: each staged map renamed over its old pin, removed maps unpinned, and the
//!    record, saying what ran, renamed over the old record last.
//!
//! Copy-swap-copy rather than freezing the old program: a frozen data plane drops or
//! misroutes packets, while the difference between two copies a few milliseconds apart is
//! small and every entry in it is settled by the rule of step 4.
pub mod copy;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_common::{
    ABI_MAP, ABI_VERSION, BPF_F_NO_COMMON_LRU, FLOW_TABLE_OFF, FLOW_TABLE_PER_CPU, MapKind,
    MapSpec,
    migrate::{MIGRATES_FROM, Rule},
    previous,
};

use super::rawmap::RawMap;
use crate::{Error, LoadOptions};

/// The staging directory beside `maps/` (bpffs refuses names with a dot).
pub const STAGED: &str = "next";

/// Where a migration stages the maps it creates: `next/` beside `map_dir`.
pub fn staged_dir(map_dir: &Path) -> PathBuf {
    map_dir.with_file_name(STAGED)
}

/// What the migration does with one map.
pub struct MapPlan {
    pub name: &'static str,
    pub rule: Rule,
    /// Entries to copy: the live entries of a hash map, every index of an array.
    pub entries: u64,
    /// Entries of the map it gets (0 when removed).
    pub capacity: u32,
    /// Kernel memory of the new map (0 when reused or removed).
    pub bytes: u64,
}

/// A migration of the pins under a map directory, as planned (nothing changed yet).
pub struct Plan {
    pub from: u32,
    pub maps: Vec<MapPlan>,
    /// Expected time of both copies, from lookups timed on these very maps.
    pub estimate: Duration,
    /// Memory the agent holds during the copy (what the first copy wrote, to settle the
    /// difference).
    pub agent_bytes: u64,
}

impl Plan {
    /// Entries to copy in all.
    pub fn entries(&self) -> u64 {
        self.maps.iter().map(|m| m.entries).sum()
    }

    /// The maps made new (staged, then pinned over the old ones).
    pub fn created(&self) -> Vec<&'static str> {
        self.maps
            .iter()
            .filter(|m| m.rule.creates())
            .map(|m| m.name)
            .collect()
    }

    /// Kernel memory of the new maps (the old ones live until the commit).
    pub fn kernel_bytes(&self) -> u64 {
        self.maps.iter().map(|m| m.bytes).sum()
    }

    /// `lb upgrade --check`'s answer.
    pub fn report(&self, map_dir: &Path) -> String {
        let mut out = format!(
            "the maps pinned under {} are map ABI {}, this build's is {ABI_VERSION}: a start of this build migrates them\n",
            map_dir.display(),
            self.from
        );
        out.push_str(&format!(
            "{:<18} {:<13} {:>9} {:>10}\n",
            "MAP", "RULE", "ENTRIES", "CAPACITY"
        ));
        for m in &self.maps {
            let entries = if m.rule.copies() {
                m.entries.to_string()
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "{:<18} {:<13} {entries:>9} {:>10}\n",
                m.name,
                m.rule.name(),
                m.capacity
            ));
        }
        out.push_str(&format!(
            "{} entries to copy in about {} ms (timed on these maps), after the program load every start does; the old program forwards until the swap that follows the first copy; memory: {} KiB of kernel memory for the new maps while the old ones live, {} KiB in the agent during the copy\n",
            self.entries(),
            self.estimate.as_millis().max(1),
            self.kernel_bytes().div_ceil(1024),
            self.agent_bytes.div_ceil(1024),
        ));
        out
    }
}

/// What a migration did: kept in the new record, shown by `lb stats` and the status page.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub from: u32,
    pub maps: u32,
    pub entries: u64,
    pub took: Duration,
}

fn refused(map_dir: &Path, what: String) -> Error {
    Error::Conflict(format!(
        "the maps pinned under {} cannot be migrated ({what}): start the build that made them, or start with --fresh to discard the old state (its flows are lost)",
        map_dir.display()
    ))
}

/// The load options a pinned record was made with (the ones that size maps).
pub fn options_of(record: &lb_common::AbiRecord) -> LoadOptions {
    LoadOptions {
        ring_size: record.ring_size,
        max_vips: record.max_vips,
        max_backends: record.max_backends,
        flow_entries: record.flow_entries,
        hash_seed: record.hash_seed,
        per_cpu_flows: record.flow_table == FLOW_TABLE_PER_CPU,
        flow_table_off: record.flow_table == FLOW_TABLE_OFF,
        ..LoadOptions::default()
    }
}

/// Entries of map `m` under `opts`, as the kernel makes it.
pub fn entries_of(m: &MapSpec, opts: &LoadOptions) -> Result<u32, Error> {
    let mut entries = opts.capacity(m.capacity)?;
    if m.flags & BPF_F_NO_COMMON_LRU != 0 {
        // The kernel rounds an LRU with per-CPU lists up to a multiple of the possible CPUs.
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1) as u32);
        entries = entries.div_ceil(cpus) * cpus;
    }
    Ok(entries)
}

/// Whether the pinned `map` is what `m` describes with `entries` entries.
pub fn same_shape(map: &RawMap, m: &MapSpec, entries: u32) -> bool {
    map.map_type == Some(super::pins::map_type(m.kind))
        && map.key_size == m.key_size
        && map.value_size == m.value_size
        && map.max_entries == entries
        && map.flags & BPF_F_NO_COMMON_LRU == m.flags & BPF_F_NO_COMMON_LRU
}

/// Kernel memory of a map of `m`'s shape with `entries` entries, roughly: a hash element
/// carries about 64 bytes of the kernel's own beside its key and value.
fn map_bytes(m: &MapSpec, entries: u32) -> u64 {
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u64;
    let value = u64::from(m.value_size).div_ceil(8) * 8;
    let per = match m.kind {
        MapKind::PerCpuArray => value * cpus,
        MapKind::Array | MapKind::ProgArray => value,
        // A trie without preallocation takes memory per entry written: this is its bound.
        MapKind::Hash | MapKind::LruHash | MapKind::DevMapHash | MapKind::LpmTrie => {
            u64::from(m.key_size) + value + 64
        }
        // A ring buffer's capacity is its size in bytes.
        MapKind::RingBuf => 1,
    };
    per * u64::from(entries)
}

/// Whether a new map of `capacity` entries takes the `entries` of the old one.
fn room(name: &str, entries: u64, capacity: u32) -> Result<(), String> {
    if entries > u64::from(capacity) {
        return Err(format!(
            "map {name} holds {entries} entries and this build's has room for {capacity}: start with options that give it room"
        ));
    }
    Ok(())
}

/// Whether the map pinned as `old` has the new layout and not the old one (told apart only
/// when the two differ).
fn already_new(
    map_dir: &Path,
    old: &MapSpec,
    new: &MapSpec,
    opts: &LoadOptions,
    capacity: u32,
) -> bool {
    let (Ok(map), Ok(old_entries)) = (RawMap::open(&map_dir.join(old.name)), entries_of(old, opts))
    else {
        return false;
    };
    same_shape(&map, new, capacity) && !same_shape(&map, old, old_entries)
}

/// The pinned map `old` describes, checked to be what the previous ABI made.
fn open_old(map_dir: &Path, old: &MapSpec, opts: &LoadOptions) -> Result<RawMap, Error> {
    let want = entries_of(old, opts)?;
    let map = RawMap::open(&map_dir.join(old.name)).map_err(|e| {
        refused(
            map_dir,
            format!(
                "map {} of ABI {MIGRATES_FROM} is not readable: {e}",
                old.name
            ),
        )
    })?;
    if !same_shape(&map, old, want) {
        return Err(refused(
            map_dir,
            format!(
                "map {} is not as ABI {MIGRATES_FROM} makes it: key {} value {} entries {}, expected key {} value {} entries {want}",
                old.name,
                map.key_size,
                map.value_size,
                map.max_entries,
                old.key_size,
                old.value_size
            ),
        ));
    }
    Ok(map)
}

/// Plans the migration of the pins under `map_dir` (made by [`MIGRATES_FROM`] with the same
/// options as `opts`) to this build, or says why it cannot be done. Reads only.
pub fn plan(map_dir: &Path, opts: &LoadOptions) -> Result<Plan, Error> {
    let mut maps = Vec::new();
    let (mut lookups, mut spent, mut agent_bytes) = (0u64, Duration::ZERO, 0u64);
    for m in lb_common::migrate::migrations() {
        let rule = m
            .rule
            .map_err(|why| refused(map_dir, format!("map {}: {why}", m.name)))?;
        let capacity = match m.new {
            Some(new) => entries_of(new, opts)?,
            None => 0,
        };
        let bytes = match m.new {
            Some(new) if rule.creates() => map_bytes(new, capacity),
            _ => 0,
        };
        let mut entries = 0;
        // A migration stopped between renaming this map into place and writing the record
        // left it in this ABI's layout already: adopt it.
        let resumed = match (m.old, m.new) {
            (Some(old), Some(new)) if rule.creates() => {
                already_new(map_dir, old, new, opts, capacity)
            }
            _ => false,
        };
        let (rule, bytes) = if resumed {
            (Rule::Reuse, 0)
        } else {
            (rule, bytes)
        };
        if let Some(old) = m.old.filter(|_| !resumed) {
            let map = open_old(map_dir, old, opts)?;
            if rule.copies() {
                let keys = map
                    .keys()
                    .map_err(Error::io(format!("reading map {}", old.name)))?;
                entries = keys.len() as u64;
                room(old.name, entries, capacity).map_err(|why| refused(map_dir, why))?;
                // Time lookups on this map: the copies are lookups and updates like them.
                let t = Instant::now();
                for k in keys.iter().take(256) {
                    let _ = map.lookup(k);
                    lookups += 1;
                }
                spent += t.elapsed();
                agent_bytes += entries * (u64::from(old.key_size) + 2 * map.value_len as u64);
            }
        }
        maps.push(MapPlan {
            name: m.name,
            rule,
            entries,
            capacity,
            bytes,
        });
    }
    let per_lookup = if lookups == 0 {
        Duration::ZERO
    } else {
        spent / lookups as u32
    };
    let entries: u64 = maps.iter().map(|m| m.entries).sum();
    // Each entry: a lookup and an update in the first copy, two lookups in the second.
    let estimate = per_lookup.saturating_mul(u32::try_from(entries * 4).unwrap_or(u32::MAX));
    Ok(Plan {
        from: previous::VERSION,
        maps,
        estimate,
        agent_bytes,
    })
}

/// Removes whatever an earlier, interrupted migration staged.
pub fn clear_staged(map_dir: &Path) {
    let dir = staged_dir(map_dir);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(&dir);
}

/// Makes the staged maps the pinned set: each renamed over its old pin (bpffs replaces it in
/// one step), removed maps unpinned, and the new record, saying what ran, last.
pub fn commit(plan: &Plan, map_dir: &Path, opts: &LoadOptions, done: &Done) -> Result<(), Error> {
    let staged = staged_dir(map_dir);
    for m in &plan.maps {
        let to = map_dir.join(m.name);
        if m.rule.creates() {
            let from = staged.join(m.name);
            std::fs::rename(&from, &to).map_err(Error::io(format!(
                "pinning the migrated map {} at {}",
                m.name,
                to.display()
            )))?;
        } else if matches!(m.rule, Rule::Remove) {
            let _ = std::fs::remove_file(&to);
        }
    }
    let mut record = super::pins::abi_record(opts);
    record.migrated_from = done.from;
    record.migrated_maps = done.maps;
    record.migrated_entries = done.entries;
    record.migrated_us = done.took.as_micros().try_into().unwrap_or(u64::MAX);
    record.migrated_at_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    super::pins::write_record(map_dir, &record)?;
    debug_assert!(map_dir.join(ABI_MAP).exists());
    clear_staged(map_dir);
    Ok(())
}

/// `lb upgrade --check`: what a start of this build would do with the pins on `iface` under
/// `bpffs` (with the options they were made with). Changes nothing.
pub fn check_pins(bpffs: &Path, iface: &str) -> Result<String, Error> {
    let bpffs = bpffs.canonicalize().unwrap_or_else(|_| bpffs.to_path_buf());
    let map_dir = super::pins::pin_dir(&bpffs, iface).join("maps");
    if std::fs::read_dir(&map_dir).map_or(true, |mut d| d.next().is_none()) {
        return Err(Error::NotFound(format!(
            "nothing is pinned for {iface} under {}: a start makes a new set, there is nothing to migrate",
            bpffs.display()
        )));
    }
    let record = super::pins::read_record(&map_dir)?;
    let opts = options_of(&record);
    match super::pins::check(&map_dir, &opts)? {
        super::pins::Pins::Migrate(plan) => Ok(plan.report(&map_dir)),
        _ => Ok(format!(
            "the maps pinned under {} are map ABI {ABI_VERSION}, this build's: a start adopts them as they are, nothing to migrate\n",
            map_dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_smaller_table_than_the_live_entries_is_refused() {
        assert_eq!(super::room("LB_NAT_FWD", 65536, 65536), Ok(()));
        let e = super::room("LB_NAT_FWD", 40000, 32768).expect_err("refused");
        assert_eq!(
            e,
            "map LB_NAT_FWD holds 40000 entries and this build's has room for 32768: start with options that give it room"
        );
        let line =
            super::refused(std::path::Path::new("/sys/fs/bpf/xdp-lb/eth0/maps"), e).to_string();
        assert!(!line.contains('\n') && line.contains("--fresh"), "{line}");
    }
}
