//! How a pinned set of the previous ABI ([`crate::previous`]) becomes this ABI's, map by map.
//! Most rules follow from comparing the frozen description of each map with the current one
//! ([`LB_MAPS`]); the two lists below are the only choices a change makes by hand: how a
//! map whose entries changed shape is converted, and where counters move when appended
//! before a trailing special entry. The agent carries the rules out
//! (`lb-userspace/src/dataplane/migrate.rs`); a unit test fails when a map has no rule, or
//! when [`ABI_VERSION`] moves on without a frozen previous ABI.
use crate::{
    abi::{ABI_VERSION, previous},
    maps::{Capacity, LB_MAPS, MapKind, MapSpec},
};

/// Converts one entry of the previous ABI's map into this ABI's: the old key and value in,
/// the new key and value written into zeroed buffers of the new sizes. `false` drops the
/// entry (it has no meaning any more).
pub type ConvertFn = fn(old_key: &[u8], old_value: &[u8], key: &mut [u8], value: &mut [u8]) -> bool;

/// Where a counter of the previous ABI's per-CPU array goes in this ABI's.
pub type IndexFn = fn(u32) -> u32;

/// A map whose entries changed shape, and the function that converts them.
#[derive(Clone, Copy)]
pub struct Conversion {
    pub map: &'static str,
    pub convert: ConvertFn,
}

/// Every map whose key or value changed shape since the previous ABI, with its conversion
/// (a frozen copy of the old type beside the new one, and a pure function between them).
/// A value-only change is one line around [`value_by`]:
///
/// ```ignore
/// fn nat_entry(ok: &[u8], ov: &[u8], k: &mut [u8], v: &mut [u8]) -> bool {
///     // SAFETY: both are plain repr(C) integer types, as every map type here.
///     unsafe { value_by(ok, ov, k, v, NatEntry::from_v14) }
/// }
/// ```
/// (None from ABI 14 to 15: no pinned map's entries changed shape.)
pub const CONVERSIONS: &[Conversion] = &[];

/// The usual conversion: the key kept as it is, the value read as an `O`, converted by `f`
/// and written as an `N`. `false` (the entry dropped) when a size does not match.
///
/// # Safety
///
/// `O` and `N` must be plain `#[repr(C)]` data that any byte pattern is a value of (integers
/// and arrays of them, as every map type of this crate: no `bool`, no enum, no reference).
pub unsafe fn value_by<O: Copy, N: Copy>(
    old_key: &[u8],
    old_value: &[u8],
    key: &mut [u8],
    value: &mut [u8],
    f: fn(O) -> N,
) -> bool {
    use core::mem::size_of;
    if old_value.len() != size_of::<O>()
        || value.len() != size_of::<N>()
        || key.len() != old_key.len()
    {
        return false;
    }
    key.copy_from_slice(old_key);
    // SAFETY: the lengths match, and the caller promises every byte pattern is an `O`.
    let old: O = unsafe { core::ptr::read_unaligned(old_value.as_ptr().cast::<O>()) };
    let new = f(old);
    // SAFETY: `value` holds exactly `size_of::<N>()` bytes; `new` is plain data.
    unsafe { core::ptr::write_unaligned(value.as_mut_ptr().cast::<N>(), new) };
    true
}

/// Counter arrays whose entries move when counters are appended: `LB_STATS` keeps the
/// express lane's count after the last counter.
pub const INDEX_MOVES: &[(&str, IndexFn)] = &[(crate::STATS_MAP, previous::stats_index)];

/// What the migration does with one map.
#[derive(Clone, Copy)]
pub enum Rule {
    /// Same layout and capacity: the pinned map is adopted as it is, shared by the old and
    /// the new program (nothing to copy, nothing lost).
    Reuse,
    /// Same entries, another capacity or flags: copied as they are into a new map.
    Copy,
    /// Entries converted one by one into a new map.
    Convert(ConvertFn),
    /// Counters (a per-CPU array) with entries appended: copied per CPU, index by index
    /// through the function, into a larger new map, and what the old program counted until
    /// the swap added after it, so totals never go backwards.
    Grow(IndexFn),
    /// Not in the previous ABI: created empty (the agent fills it as on a fresh start).
    New,
    /// The program array: always new, holding the new programs, so the old program keeps
    /// tail-calling its own until the link swaps.
    Programs,
    /// Not in this ABI: unpinned once the new program runs.
    Remove,
}

impl Rule {
    /// Its name in `lb upgrade --check`.
    pub const fn name(&self) -> &'static str {
        match self {
            Rule::Reuse => "reused",
            Rule::Copy => "copied",
            Rule::Convert(_) => "converted",
            Rule::Grow(_) => "grown",
            Rule::New => "new",
            Rule::Programs => "new programs",
            Rule::Remove => "removed",
        }
    }

    /// Whether the map is made new (and pinned in place of the old one at the end).
    pub const fn creates(&self) -> bool {
        !matches!(self, Rule::Reuse | Rule::Remove)
    }

    /// Whether entries are copied across.
    pub const fn copies(&self) -> bool {
        matches!(self, Rule::Copy | Rule::Convert(_) | Rule::Grow(_))
    }
}

fn conversion(name: &str) -> Option<ConvertFn> {
    CONVERSIONS
        .iter()
        .find(|c| c.map == name)
        .map(|c| c.convert)
}

fn index_move(name: &str) -> IndexFn {
    INDEX_MOVES
        .iter()
        .find(|(m, _)| *m == name)
        .map_or(same_index, |(_, f)| *f)
}

fn same_index(i: u32) -> u32 {
    i
}

/// The rule for a map described as `old` by the previous ABI and `new` by this one (either
/// absent), or why there is none.
pub fn rule(old: Option<&MapSpec>, new: Option<&MapSpec>) -> Result<Rule, &'static str> {
    let (old, new) = match (old, new) {
        (None, None) => return Err("described by neither ABI"),
        (None, Some(_)) => return Ok(Rule::New),
        (Some(_), None) => return Ok(Rule::Remove),
        (Some(o), Some(n)) => (o, n),
    };
    if new.kind == MapKind::ProgArray {
        return Ok(Rule::Programs);
    }
    if let Some(convert) = conversion(new.name) {
        if old.kind != new.kind || new.kind == MapKind::PerCpuArray {
            return Err("a conversion needs a map of the same kind, not a per-CPU one");
        }
        return Ok(Rule::Convert(convert));
    }
    if old == new {
        return Ok(Rule::Reuse);
    }
    if old.kind != new.kind || old.key_size != new.key_size || old.value_size != new.value_size {
        return Err("its layout changed without a conversion in lb-common's CONVERSIONS");
    }
    if new.kind != MapKind::PerCpuArray {
        return Ok(Rule::Copy);
    }
    match (old.capacity, new.capacity) {
        (Capacity::Fixed(o), Capacity::Fixed(n)) if n >= o => Ok(Rule::Grow(index_move(new.name))),
        _ => Err("a counter array may only grow by appended entries"),
    }
}

/// One map of the migration from the previous ABI: its name, both descriptions and its rule.
pub struct MapMigration {
    pub name: &'static str,
    pub old: Option<&'static MapSpec>,
    pub new: Option<&'static MapSpec>,
    pub rule: Result<Rule, &'static str>,
}

/// Every pinned map of either ABI with its rule: the previous ABI's in its order, then the
/// maps this ABI adds.
pub fn migrations() -> impl Iterator<Item = MapMigration> {
    let pinned = |name: &str| LB_MAPS.iter().find(|m| m.pinned && m.name == name);
    let from_old = previous::MAPS.iter().map(move |o| MapMigration {
        name: o.name,
        old: Some(o),
        new: pinned(o.name),
        rule: rule(Some(o), pinned(o.name)),
    });
    let added = LB_MAPS
        .iter()
        .filter(|n| n.pinned && previous::MAPS.iter().all(|o| o.name != n.name))
        .map(|n| MapMigration {
            name: n.name,
            old: None,
            new: Some(n),
            rule: rule(None, Some(n)),
        });
    from_old.chain(added)
}

/// The version a pinned set must have to be migrated by this build.
pub const MIGRATES_FROM: u32 = previous::VERSION;
const _: () = assert!(
    MIGRATES_FROM + 1 == ABI_VERSION,
    "ABI_VERSION moved on without a frozen previous ABI: see DEVELOPING.md, Adding a migration"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::MapKind::{Array, Hash, PerCpuArray};

    const fn spec(kind: MapKind, value_size: u32, capacity: Capacity) -> MapSpec {
        MapSpec {
            name: "T",
            kind,
            key_size: 4,
            value_size,
            capacity,
            flags: 0,
            pinned: true,
        }
    }

    #[test]
    fn every_map_of_both_abis_has_a_rule() {
        let mut n = 0;
        for m in migrations() {
            if let Err(why) = m.rule {
                panic!(
                    "map {}: no migration from ABI {MIGRATES_FROM}: {why}",
                    m.name
                );
            }
            n += 1;
        }
        assert!(n >= previous::MAPS.len());
        // The program array is never shared between the two programs.
        let progs = migrations().find(|m| m.name == crate::PROGS_MAP).unwrap();
        assert!(matches!(progs.rule, Ok(Rule::Programs)));
    }

    #[test]
    fn the_version_follows_the_frozen_previous_abi() {
        // Also a compile-time assert: bumping ABI_VERSION means freezing the ABI before it
        // (a new `abi/vN.rs`, `previous` pointing at it) and its conversions.
        assert_eq!(ABI_VERSION, MIGRATES_FROM + 1);
        let old_record = core::mem::size_of::<previous::Record>();
        assert!(core::mem::size_of::<crate::AbiRecord>() >= old_record);
        assert_eq!(
            core::mem::offset_of!(crate::AbiRecord, hash_seed),
            core::mem::offset_of!(previous::Record, hash_seed)
        );
    }

    #[test]
    fn rules_follow_the_descriptions() {
        let a = spec(Hash, 8, Capacity::MaxVips);
        assert!(matches!(rule(Some(&a), Some(&a)), Ok(Rule::Reuse)));
        assert!(matches!(rule(None, Some(&a)), Ok(Rule::New)));
        assert!(matches!(rule(Some(&a), None), Ok(Rule::Remove)));
        let bigger = spec(Hash, 8, Capacity::Fixed(10));
        assert!(matches!(rule(Some(&a), Some(&bigger)), Ok(Rule::Copy)));
        let wider = spec(Hash, 12, Capacity::MaxVips);
        assert_eq!(
            rule(Some(&a), Some(&wider)).err(),
            Some("its layout changed without a conversion in lb-common's CONVERSIONS")
        );
        let array = spec(Array, 8, Capacity::MaxVips);
        assert!(rule(Some(&a), Some(&array)).is_err());
        let (c19, c21) = (
            spec(PerCpuArray, 16, Capacity::Fixed(19)),
            spec(PerCpuArray, 16, Capacity::Fixed(21)),
        );
        assert!(matches!(rule(Some(&c19), Some(&c21)), Ok(Rule::Grow(_))));
        assert_eq!(
            rule(Some(&c21), Some(&c19)).err(),
            Some("a counter array may only grow by appended entries")
        );
    }

    #[test]
    fn a_value_conversion_keeps_the_key_and_converts_every_field() {
        #[derive(Clone, Copy)]
        #[repr(C)]
        struct Old {
            a: u32,
            b: u16,
            c: u16,
        }
        #[derive(Clone, Copy, Debug, PartialEq)]
        #[repr(C)]
        struct New {
            a: u64,
            c: u32,
            b: u16,
            pad: u16,
        }
        fn up(o: Old) -> New {
            New {
                a: u64::from(o.a),
                c: u32::from(o.c),
                b: o.b,
                pad: 0,
            }
        }
        let old = Old {
            a: 0x0102_0304,
            b: 0x0506,
            c: 0x0708,
        };
        let mut old_bytes = [0u8; 8];
        // SAFETY: test types, plain integers.
        unsafe { core::ptr::write_unaligned(old_bytes.as_mut_ptr().cast::<Old>(), old) };
        let (mut k, mut v) = ([0u8; 4], [0u8; 16]);
        // SAFETY: plain integer types.
        assert!(unsafe { value_by(&[9, 8, 7, 6], &old_bytes, &mut k, &mut v, up) });
        assert_eq!(k, [9, 8, 7, 6]);
        // SAFETY: 16 bytes written as a `New` just above.
        let new: New = unsafe { core::ptr::read_unaligned(v.as_ptr().cast::<New>()) };
        assert_eq!(
            new,
            New {
                a: 0x0102_0304,
                c: 0x0708,
                b: 0x0506,
                pad: 0
            }
        );
        let mut short = [0u8; 12];
        // SAFETY: as above; the size mismatch is refused before any read.
        assert!(!unsafe { value_by(&[0; 4], &old_bytes, &mut k, &mut short, up) });
    }

    #[test]
    fn appended_stats_move_the_express_lanes_count_to_the_end() {
        let stats = MapSpec {
            name: crate::STATS_MAP,
            ..spec(
                PerCpuArray,
                16,
                Capacity::Fixed(previous::STATS_CACHE_HITS + 1),
            )
        };
        let grown = MapSpec {
            capacity: Capacity::Fixed(previous::STATS_CACHE_HITS + 3),
            ..stats
        };
        let Ok(Rule::Grow(index)) = rule(Some(&stats), Some(&grown)) else {
            panic!("LB_STATS grown by two counters is not a Grow");
        };
        for i in 0..previous::STATS_CACHE_HITS {
            assert_eq!(index(i), i);
        }
        assert_eq!(index(previous::STATS_CACHE_HITS), crate::STATS_CACHE_HITS);
    }
}
