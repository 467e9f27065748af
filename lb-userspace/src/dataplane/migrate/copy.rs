//! The two copies of a migration (see the module above): the first before the program swap,
//! while only the old program writes the old maps and nothing writes the new ones; the
//! difference after it, while only the new program writes the new ones.
use std::{collections::HashMap, path::Path};

use lb_common::migrate::{IndexFn, Rule};

use super::{Plan, staged_dir};
use crate::{
    Error,
    dataplane::rawmap::{BPF_ANY, BPF_NOEXIST, RawMap},
};

/// What the first copy wrote for one old key: the old value it read, and the new key and
/// value it wrote.
struct Wrote {
    old: Vec<u8>,
    key: Vec<u8>,
    value: Vec<u8>,
}

enum How {
    /// Flows, NAT and the like: entries converted one by one (`None`: as they are).
    State(Option<lb_common::migrate::ConvertFn>),
    /// Counters: per CPU, index by index through the function.
    Counters(IndexFn),
}

struct MapCopy {
    name: &'static str,
    old: RawMap,
    new: RawMap,
    how: How,
    wrote: HashMap<Vec<u8>, Wrote>,
}

/// The maps being copied, with what the first copy wrote.
pub struct Copier {
    maps: Vec<MapCopy>,
}

fn io(what: &'static str, name: &str) -> impl Fn(std::io::Error) -> Error {
    let what = format!("{what} map {name}");
    move |e| Error::io(what.clone())(e)
}

impl MapCopy {
    /// The new key and value for an old entry (`None`: dropped by the conversion).
    fn convert(&self, key: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        match self.how {
            How::State(None) => Some((key.to_vec(), value.to_vec())),
            How::State(Some(f)) => {
                let mut k = vec![0u8; self.new.key_size as usize];
                let mut v = vec![0u8; self.new.value_len];
                f(key, value, &mut k, &mut v).then_some((k, v))
            }
            How::Counters(index) => {
                let i = u32::from_ne_bytes(key.try_into().ok()?);
                Some((index(i).to_ne_bytes().to_vec(), value.to_vec()))
            }
        }
    }

    fn first(&mut self) -> Result<u64, Error> {
        let keys = self.old.keys().map_err(io("reading", self.name))?;
        for k in keys {
            let Some(v) = self.old.lookup(&k).map_err(io("reading", self.name))? else {
                continue;
            };
            let Some((nk, nv)) = self.convert(&k, &v) else {
                continue;
            };
            self.new
                .update(&nk, &nv, BPF_ANY)
                .map_err(io("writing the new", self.name))?;
            self.wrote.insert(
                k,
                Wrote {
                    old: v,
                    key: nk,
                    value: nv,
                },
            );
        }
        Ok(self.wrote.len() as u64)
    }

    /// Settles what the old program wrote after the first copy; returns the entries
    /// written.
    fn difference(&self) -> Result<u64, Error> {
        let mut n = 0;
        let keys = self.old.keys().map_err(io("reading", self.name))?;
        for k in keys {
            let Some(v) = self.old.lookup(&k).map_err(io("reading", self.name))? else {
                continue;
            };
            let before = self.wrote.get(&k);
            if before.is_some_and(|w| w.old == v) {
                continue;
            }
            if let How::Counters(_) = self.how {
                let Some(w) = before else { continue };
                if self.add_counts(w, &v)? {
                    n += 1;
                }
                continue;
            }
            let Some((nk, nv)) = self.convert(&k, &v) else {
                continue;
            };
            let write = match before {
                // New since the first copy: unless the new program made its own.
                None => self
                    .new
                    .update(&nk, &nv, BPF_NOEXIST)
                    .map_err(io("writing the new", self.name))?,
                // Changed since: only where the new program has not changed it since.
                Some(w) => {
                    let now = self
                        .new
                        .lookup(&w.key)
                        .map_err(io("reading the new", self.name))?;
                    now.as_deref() == Some(&w.value[..])
                        && self
                            .new
                            .update(&nk, &nv, BPF_ANY)
                            .map_err(io("writing the new", self.name))?
                }
            };
            n += u64::from(write);
        }
        Ok(n)
    }

    /// Adds what the old program counted since the first copy (`now` - `w.old`, word by
    /// word) to the new map's entry.
    fn add_counts(&self, w: &Wrote, now: &[u8]) -> Result<bool, Error> {
        let Some(mut cur) = self
            .new
            .lookup(&w.key)
            .map_err(io("reading the new", self.name))?
        else {
            return Ok(false);
        };
        add_words(&mut cur, &w.old, now);
        self.new
            .update(&w.key, &cur, BPF_ANY)
            .map_err(io("writing the new", self.name))
    }
}

/// `cur += now - before`, as native-endian u64 words (counters are u64 fields; per-CPU
/// values are 8-byte slots).
pub fn add_words(cur: &mut [u8], before: &[u8], now: &[u8]) {
    let word = |b: &[u8], i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    let mut i = 0;
    while i + 8 <= cur.len().min(before.len()).min(now.len()) {
        let sum = word(cur, i).wrapping_add(word(now, i).wrapping_sub(word(before, i)));
        cur[i..i + 8].copy_from_slice(&sum.to_ne_bytes());
        i += 8;
    }
}

impl Copier {
    /// The first copy: every entry of every copied map into its staged new map. Returns the
    /// copier and the entries written.
    pub fn first(plan: &Plan, map_dir: &Path) -> Result<(Copier, u64), Error> {
        let staged = staged_dir(map_dir);
        let mut maps = Vec::new();
        let mut n = 0;
        for m in plan.maps.iter().filter(|m| m.rule.copies()) {
            let open = |p: &Path| {
                RawMap::open(p).map_err(Error::io(format!("opening map {}", p.display())))
            };
            let how = match m.rule {
                Rule::Convert(f) => How::State(Some(f)),
                Rule::Grow(index) => How::Counters(index),
                _ => How::State(None),
            };
            let mut c = MapCopy {
                name: m.name,
                old: open(&map_dir.join(m.name))?,
                new: open(&staged.join(m.name))?,
                how,
                wrote: HashMap::new(),
            };
            n += c.first()?;
            maps.push(c);
        }
        Ok((Copier { maps }, n))
    }

    /// The second copy, after the swap: the difference. Returns the entries written.
    pub fn difference(self) -> Result<u64, Error> {
        let mut n = 0;
        for m in &self.maps {
            n += m.difference()?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_since_the_first_copy_are_added_word_by_word() {
        let w = |v: &[u64]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let mut cur = w(&[5, 100, 0]);
        super::add_words(&mut cur, &w(&[10, 1000, 7]), &w(&[13, 1500, 7]));
        assert_eq!(cur, w(&[8, 600, 0]));
    }
}
