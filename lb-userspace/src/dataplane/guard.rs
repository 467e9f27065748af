//! The guard's four LPM tries (`lb_common::guard`) as the agent writes them: entries grouped
//! by trie and written or deleted with one `BPF_MAP_*_BATCH` call per chunk, so a list of a
//! million prefixes is a few hundred syscalls rather than a million.
use std::{collections::BTreeSet, net::IpAddr, os::fd::AsFd as _, sync::Arc};

use aya::maps::{Array, LpmTrie, Map, MapData, lpm_trie::Key};
use lb_common::{
    ALLOW4_MAP, ALLOW6_MAP, DENY4_MAP, DENY6_MAP, GuardSrc4, GuardSrc6, VIP_RATE_MAP, VipRate,
    guard_prefix_len,
};

use crate::{
    Error,
    agent::guard::{Pending, Rates, SourceRule, Sources, to_delete, to_write, unix_now_s},
    model::Prefix,
    net::{addr_words, words_addr},
};

/// Entries per batch call: bounds the kernel's time in one syscall and the buffers' size.
const CHUNK: usize = 65_536;

/// The four tries, kept as maps: written by raw batch calls on their descriptors, read
/// through a typed view made when needed.
pub struct GuardTables {
    allow4: Map,
    allow6: Map,
    deny4: Map,
    deny6: Map,
    /// The new-flow limits by VIP id.
    rates: Array<MapData, VipRate>,
    /// What the tries hold, as last read or written.
    held: Sources,
    /// The entries the tries hold exactly, when known to be one laid-out list: a change that
    /// leaves the lists alone passes it again and costs no walk of a million entries.
    synced: Option<Arc<Sources>>,
    /// A saved change's entries written ahead of its commit ([`GuardTables::prewrite`]).
    pending: Option<Pending>,
}

/// The typed view of trie `map`, checking its key and value sizes.
fn trie<K: aya::Pod>(map: &Map) -> Result<LpmTrie<&MapData, K, u64>, Error> {
    LpmTrie::try_from(map).map_err(|e| Error::Kernel(format!("a source list's map: {e}")))
}

/// The descriptor of trie `map`.
fn fd(map: &Map) -> std::os::fd::BorrowedFd<'_> {
    match map {
        Map::LpmTrie(m) => m.fd().as_fd(),
        // `GuardTables::new` checked every map's type.
        _ => unreachable!("a source list is an LPM trie"),
    }
}

/// A deny entry's end as the program reads it (monotonic nanoseconds; 0: never) from its end
/// in Unix seconds; one already past ends at 1 (long gone).
fn end_ns(end_unix: u64) -> u64 {
    if end_unix == 0 {
        return 0;
    }
    let now = unix_now_s();
    if end_unix <= now {
        return 1;
    }
    crate::clock::monotonic_ns().saturating_add((end_unix - now).saturating_mul(1_000_000_000))
}

fn key4(r: &SourceRule) -> Key<GuardSrc4> {
    Key::new(
        guard_prefix_len(r.prefix.len as u32),
        GuardSrc4 {
            scope: r.scope,
            addr: addr_words(r.prefix.addr)[0],
        },
    )
}

fn key6(r: &SourceRule) -> Key<GuardSrc6> {
    Key::new(
        guard_prefix_len(r.prefix.len as u32),
        GuardSrc6 {
            scope: r.scope,
            addr: addr_words(r.prefix.addr),
        },
    )
}

impl GuardTables {
    pub fn new(
        allow4: Map,
        allow6: Map,
        deny4: Map,
        deny6: Map,
        rates: Map,
    ) -> Result<Self, Error> {
        let rates = Array::try_from(rates)
            .map_err(|e| Error::Kernel(format!("map {VIP_RATE_MAP}: {e}")))?;
        for (m, name) in [
            (&allow4, ALLOW4_MAP),
            (&allow6, ALLOW6_MAP),
            (&deny4, DENY4_MAP),
            (&deny6, DENY6_MAP),
        ] {
            if !matches!(m, Map::LpmTrie(_)) {
                return Err(Error::Kernel(format!("map {name} is not an LPM trie")));
            }
        }
        trie::<GuardSrc4>(&allow4)?;
        trie::<GuardSrc6>(&allow6)?;
        trie::<GuardSrc4>(&deny4)?;
        trie::<GuardSrc6>(&deny6)?;
        Ok(GuardTables {
            allow4,
            allow6,
            deny4,
            deny6,
            rates,
            held: Sources::new(),
            synced: None,
            pending: None,
        })
    }

    /// Reads what the tries hold again.
    pub fn resync(&mut self) -> Result<(), Error> {
        self.synced = None;
        self.held = self.read_all()?;
        Ok(())
    }

    fn is_synced(&self, want: &Arc<Sources>) -> bool {
        self.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, want))
    }

    /// After a write that succeeded: the tries hold `want` exactly when they hold as many
    /// entries (they hold all of it after `add`, nothing else after `prune`).
    fn mark(&mut self, want: &Arc<Sources>) {
        self.synced = (self.held.len() == want.len()).then(|| want.clone());
    }

    /// Writes the entries of `want` the tries lack or hold with another end.
    pub fn add(&mut self, want: &Arc<Sources>) -> Result<(), Error> {
        if self.is_synced(want) {
            return Ok(());
        }
        let new = to_write(&self.held, want, &Default::default(), self.pending.as_ref());
        // With a change pending some entries may have been left at its end: not synced.
        let exact = self.pending.is_none();
        self.write_new(new, want, exact)
    }

    /// Writes a saved change's entries `want` ahead of its commit, but for those under
    /// `skip` (ids changing hands at the commit: see `agent::guard::scopes_changing_hands`).
    /// Until a prune passes `want` itself (the commit's convergence), prunes keep them: a
    /// convergence of the state before the change (a retry, a health flip) runs meanwhile
    /// and would otherwise delete them, and a new node deny would flap.
    pub fn prewrite(&mut self, want: &Arc<Sources>, skip: &BTreeSet<u32>) -> Result<(), Error> {
        self.pending = Some(Pending { want: want.clone() });
        if skip.is_empty() && self.is_synced(want) {
            return Ok(());
        }
        let new = to_write(&self.held, want, skip, None);
        self.write_new(new, want, skip.is_empty())
    }

    /// Writes `new`, entries toward `want`; the tries then hold `want` exactly when `exact`
    /// (nothing of it was left out) and as many entries are held.
    fn write_new(
        &mut self,
        new: Vec<(SourceRule, u64)>,
        want: &Arc<Sources>,
        exact: bool,
    ) -> Result<(), Error> {
        let result = if new.is_empty() {
            Ok(())
        } else {
            self.write(&new)
        };
        // Read back on failure: a batch may have gone part of the way.
        match &result {
            Ok(()) => {
                self.held.extend(new);
                if exact {
                    self.mark(want);
                } else {
                    self.synced = None;
                }
            }
            Err(_) => self.forget(),
        }
        result
    }

    /// After a failed write: what the tries hold is read again, nothing taken as synced.
    fn forget(&mut self) {
        self.synced = None;
        self.held = self.read_all().unwrap_or_default();
    }

    /// Deletes the entries the tries hold that `want` does not.
    /// Entries a pending change wrote are kept until `want` is that change's own.
    pub fn prune(&mut self, want: &Arc<Sources>) -> Result<(), Error> {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.want, want))
        {
            self.pending = None;
        }
        if self.is_synced(want) {
            return Ok(());
        }
        let gone = to_delete(&self.held, want, self.pending.as_ref());
        let result = if gone.is_empty() {
            Ok(())
        } else {
            self.delete(&gone)
        };
        match &result {
            Ok(()) => {
                gone.iter().for_each(|r| {
                    self.held.remove(r);
                });
                self.mark(want);
            }
            Err(_) => self.forget(),
        }
        result
    }

    /// Applies a change of the node's deny list: edits the core's entries `sources` in place
    /// by `add` and `remove`, writes `add`, then deletes `remove` (see
    /// `Kernel::apply_source_delta`). The tries' references to `sources` are let go first
    /// so the edit does not copy a million entries; when they held it exactly before, they
    /// hold the edited entries exactly after, and the convergence that follows (flags) costs
    /// no walk. On a failed write the entries are still edited, the tries read back.
    pub fn apply_delta(
        &mut self,
        sources: &mut Arc<Sources>,
        add: &[(SourceRule, u64)],
        remove: &[SourceRule],
    ) -> Result<(), Error> {
        let was_synced = self.synced.take().is_some_and(|s| Arc::ptr_eq(&s, sources));
        // A committed change's entries: the core's own now, nothing left to keep for it.
        if self
            .pending
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.want, sources))
        {
            self.pending = None;
        }
        crate::agent::guard::edit_entries(Arc::make_mut(sources), add, remove);
        let result = self.write(add).and_then(|()| {
            self.held.extend(add.iter().copied());
            self.delete(remove)
        });
        match &result {
            Ok(()) => {
                remove.iter().for_each(|r| {
                    self.held.remove(r);
                });
                if was_synced {
                    self.mark(sources);
                }
            }
            Err(_) => self.forget(),
        }
        result
    }

    /// Writes VIP `id`'s limits (restarting its bucket; all zero: no limit).
    pub fn set_rate(&mut self, id: u32, r: &VipRate) -> Result<(), Error> {
        self.rates
            .set(id, r, 0)
            .map_err(|e| Error::Kernel(format!("writing the limits of VIP id {id}: {e}")))
    }

    /// Every VIP id's limits among the first `n` ids (bucket state left out).
    pub fn read_rates(&self, n: u32) -> Result<Rates, Error> {
        let mut out = Rates::new();
        for id in 0..n {
            let r = self
                .rates
                .get(&id, 0)
                .map_err(|e| Error::Kernel(format!("reading the limits of VIP id {id}: {e}")))?;
            if r.interval_ns != 0 || r.source_interval_ns != 0 {
                out.insert(id, VipRate { tat: 0, ..r });
            }
        }
        Ok(out)
    }

    /// Writes `rules` (each with its end in Unix seconds).
    pub fn write(&mut self, rules: &[(SourceRule, u64)]) -> Result<(), Error> {
        let pick = |deny: bool, v4: bool| {
            rules
                .iter()
                .filter(move |(r, _)| r.deny == deny && r.prefix.addr.is_ipv4() == v4)
        };
        for deny in [false, true] {
            let (keys, ends): (Vec<_>, Vec<_>) =
                pick(deny, true).map(|(r, e)| (key4(r), end_ns(*e))).unzip();
            let t = if deny { &self.deny4 } else { &self.allow4 };
            batch(fd(t), &keys, Some(&ends), deny, "v4")?;
            let (keys, ends): (Vec<_>, Vec<_>) = pick(deny, false)
                .map(|(r, e)| (key6(r), end_ns(*e)))
                .unzip();
            let t = if deny { &self.deny6 } else { &self.allow6 };
            batch(fd(t), &keys, Some(&ends), deny, "v6")?;
        }
        Ok(())
    }

    /// Deletes `rules`.
    pub fn delete(&mut self, rules: &[SourceRule]) -> Result<(), Error> {
        for deny in [false, true] {
            let of = |v4: bool| {
                rules
                    .iter()
                    .filter(move |r| r.deny == deny && r.prefix.addr.is_ipv4() == v4)
            };
            let keys: Vec<_> = of(true).map(key4).collect();
            let t = if deny { &self.deny4 } else { &self.allow4 };
            batch::<_>(fd(t), &keys, None, deny, "v4")?;
            let keys: Vec<_> = of(false).map(key6).collect();
            let t = if deny { &self.deny6 } else { &self.allow6 };
            batch::<_>(fd(t), &keys, None, deny, "v6")?;
        }
        Ok(())
    }

    /// Every entry the tries hold (after a restart: pinned tries keep their entries). The
    /// ends are not read back: an entry is listed with end 0, so a deny with an end is
    /// written again by the first sync (its end is the desired state's).
    pub fn read_all(&self) -> Result<Sources, Error> {
        let mut out = Sources::new();
        let err = |e: aya::maps::MapError| Error::Kernel(format!("reading the source lists: {e}"));
        for (deny, m) in [(false, &self.allow4), (true, &self.deny4)] {
            let t = trie::<GuardSrc4>(m)?;
            for k in t.keys() {
                let k = k.map_err(err)?;
                let d = k.data();
                out.insert(
                    rule(
                        deny,
                        d.scope,
                        words_addr([d.addr, 0, 0, 0], 4),
                        k.prefix_len(),
                    ),
                    0,
                );
            }
        }
        for (deny, m) in [(false, &self.allow6), (true, &self.deny6)] {
            let t = trie::<GuardSrc6>(m)?;
            for k in t.keys() {
                let k = k.map_err(err)?;
                let d = k.data();
                out.insert(
                    rule(deny, d.scope, words_addr(d.addr, 6), k.prefix_len()),
                    0,
                );
            }
        }
        Ok(out)
    }
}

fn rule(deny: bool, scope: u32, addr: IpAddr, prefix_len: u32) -> SourceRule {
    SourceRule {
        deny,
        scope,
        prefix: Prefix {
            addr,
            len: prefix_len.saturating_sub(32) as u8,
        },
    }
}

/// Writes (`values` given) or deletes `keys` of the trie `fd`, in chunks.
fn batch<K: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[u64]>,
    deny: bool,
    family: &str,
) -> Result<(), Error> {
    let what = |e: std::io::Error| {
        Error::Kernel(format!(
            "writing the {family} {} list: {e}",
            if deny { "deny" } else { "allow" }
        ))
    };
    for (i, chunk) in keys.chunks(CHUNK).enumerate() {
        match values {
            Some(v) => {
                let v = &v[i * CHUNK..i * CHUNK + chunk.len()];
                super::batch::update(fd, chunk, v).map_err(what)?
            }
            None => super::batch::delete(fd, chunk).map_err(what)?,
        }
    }
    Ok(())
}
