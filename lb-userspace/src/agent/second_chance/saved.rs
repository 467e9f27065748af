//! The second-chance histories as saved between runs: the kernel keeps each slot's owner and
//! previous backends but no times, so without this a restarted agent cannot tell a previous
//! backend that served a slot for hours from one that held it for a millisecond while the VIP
//! was being built.
//!
//! Binary, little endian, because a VIP's history is M (65,537 by default) slots of eleven
//! numbers that JSON would make ~5 MB: each distinct slot record (owner, since, and per
//! candidate its id, tenure and end) is stored once and every slot names its record (4 bytes
//! a slot; a table change touches a few thousand records at most).
//!
//! ```text
//! "LBSC" | format u32 = 2 | saved at: unix ms u64, clock ds u32 | VIPs u32
//! per VIP: name length u16, name (UTF-8, `10.0.0.10:80/tcp`) | slots M u32 | records R u32
//!          R x (owner, since, PREVIOUS_HOPS x (candidate, tenure, ended)) u32
//!          M x record index u32
//! ```
//! Format 1 (one candidate) is not read: it went with 8-byte slots, whose pinned maps an
//! agent of format 2 refuses anyway.
//! Pure: the agent writes and reads the bytes ([`crate::agent::state::StateStore`]).
use std::collections::{BTreeMap, HashMap};

use lb_common::PREVIOUS_HOPS;

use super::{Candidate, History};
use crate::model::VipAddr;

const MAGIC: &[u8; 4] = b"LBSC";
const FORMAT: u32 = 2;
/// Larger slot tables are not ours (M is at most 2^24 here): refused as corrupt.
const MAX_SLOTS: u32 = 1 << 24;

/// Every second-chance VIP's history and the moment it was taken, in both clocks: wall
/// clock to know how long ago it was, the history clock to place its times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub unix_ms: u64,
    pub ds: u32,
    pub vips: BTreeMap<VipAddr, History>,
}

/// Words of a slot's record.
const RECORD: usize = 2 + 3 * PREVIOUS_HOPS;
type Record = [u32; RECORD];

fn record(h: &History, s: usize) -> Record {
    let mut r = [0; RECORD];
    r[0] = h.current[s];
    r[1] = h.since[s];
    for (i, c) in h.candidates[s].iter().enumerate() {
        r[2 + 3 * i..5 + 3 * i].copy_from_slice(&[c.id, c.tenure, c.ended]);
    }
    r
}

fn set_record(h: &mut History, s: usize, r: &Record) {
    h.current[s] = r[0];
    h.since[s] = r[1];
    for (i, c) in h.candidates[s].iter_mut().enumerate() {
        *c = Candidate {
            id: r[2 + 3 * i],
            tenure: r[3 + 3 * i],
            ended: r[4 + 3 * i],
        };
    }
}

pub fn encode(s: &Saved) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&s.unix_ms.to_le_bytes());
    out.extend_from_slice(&s.ds.to_le_bytes());
    out.extend_from_slice(&(s.vips.len() as u32).to_le_bytes());
    for (vip, h) in &s.vips {
        let name = vip.to_string();
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        let mut index: HashMap<Record, u32> = HashMap::new();
        let mut records: Vec<Record> = Vec::new();
        let slots: Vec<u32> = (0..h.current.len())
            .map(|i| {
                let r = record(h, i);
                *index.entry(r).or_insert_with(|| {
                    records.push(r);
                    records.len() as u32 - 1
                })
            })
            .collect();
        out.extend_from_slice(&(slots.len() as u32).to_le_bytes());
        out.extend_from_slice(&(records.len() as u32).to_le_bytes());
        for w in records.iter().flatten().chain(&slots) {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    out
}

/// Reads what [`encode`] wrote; anything else is refused with what was wrong.
pub fn decode(bytes: &[u8]) -> Result<Saved, String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != MAGIC {
        return Err("not a second-chance history (bad magic)".into());
    }
    let format = r.u32()?;
    if format != FORMAT {
        return Err(format!("format {format}, this agent reads {FORMAT}"));
    }
    let unix_ms = u64::from(r.u32()?) | (u64::from(r.u32()?) << 32);
    let ds = r.u32()?;
    let n = r.u32()?;
    let mut vips = BTreeMap::new();
    for _ in 0..n {
        let len = u16::from_le_bytes([r.u8()?, r.u8()?]) as usize;
        let name = std::str::from_utf8(r.take(len)?).map_err(|e| format!("VIP name: {e}"))?;
        let vip: VipAddr = name.parse()?;
        let (m, count) = (r.u32()?, r.u32()?);
        if m > MAX_SLOTS || count > m {
            return Err(format!("{vip}: {m} slots, {count} records"));
        }
        let mut records = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let mut rec = [0; RECORD];
            for w in &mut rec {
                *w = r.u32()?;
            }
            records.push(rec);
        }
        let mut h = History::new(vec![0; m as usize], 0);
        for s in 0..m as usize {
            let i = r.u32()?;
            let rec = records
                .get(i as usize)
                .ok_or_else(|| format!("{vip}: slot {s} names record {i} of {count}"))?;
            set_record(&mut h, s, rec);
        }
        vips.insert(vip, h);
    }
    if r.at != bytes.len() {
        return Err(format!("{} bytes after the end", bytes.len() - r.at));
    }
    Ok(Saved { unix_ms, ds, vips })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("cut short at byte {}", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Saved {
        let mut h = History::new(vec![3, 3, 2, 1], 500);
        let c = |id, tenure, ended| Candidate { id, tenure, ended };
        h.candidates[0][0] = c(1, u32::MAX, 490);
        h.candidates[2] = [c(3, 40, 495), c(1, 20, 470), c(4, 5, 480)];
        h.since[0] = 0;
        let mut vips = BTreeMap::new();
        vips.insert("10.0.0.10:80/tcp".parse().unwrap(), h.clone());
        vips.insert(
            "[2001:db8::10]:53/udp".parse().unwrap(),
            History::new(vec![7; 9], 3),
        );
        Saved {
            unix_ms: 1_790_000_000_123,
            ds: 10_000_500,
            vips,
        }
    }

    #[test]
    fn histories_come_back_as_they_were_saved() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes), Ok(s));
        // Identical slots share one record: 4 records for the first VIP, 1 for the second.
        let header = 4 + 4 + 8 + 4 + 4;
        let first = 2 + 16 + 8 + 4 * 44 + 4 * 4;
        let second = 2 + 21 + 8 + 44 + 9 * 4;
        assert_eq!(bytes.len(), header + first + second);
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        let bytes = encode(&sample());
        for cut in [0, 3, 20, 30, bytes.len() - 1] {
            let e = decode(&bytes[..cut]).unwrap_err();
            assert!(e.contains("cut short") || e.contains("magic"), "{cut}: {e}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer).unwrap_err(), "1 bytes after the end");
        let mut format = bytes.clone();
        format[4] = 9;
        assert!(decode(&format).unwrap_err().contains("format 9"));
        // A slot naming a record that does not exist.
        let mut index = bytes.clone();
        let last = index.len() - 4;
        index[last..].copy_from_slice(&99u32.to_le_bytes());
        assert!(decode(&index).unwrap_err().contains("names record 99"));
    }
}
