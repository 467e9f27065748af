//! The node's deny list on disk, apart from the state file: a snapshot (`IFACE.deny`) and an
//! append-only journal of changes since it (`IFACE.deny.journal`). A list of a million
//! prefixes is tens of megabytes; written whole at every change it would make every change
//! (a VIP added, one prefix denied) take a second. Here a VIP change does not touch these
//! files, one `lb deny add|remove` appends one line (synced), and the journal is folded into
//! a new snapshot once it has grown past the snapshot's size.
//!
//! Line-oriented text, not binary: an operator can read and grep both files, each prefix is
//! written in its one spelling and read back by the same parser as the command line, and the
//! cost over a packed record (about 20 bytes a line rather than 14 for IPv4) is paid only by
//! the snapshot, written at a bulk load or a compaction.
//!
//! Snapshot: a header `xdp-lb deny snapshot 1 gen G count N`, N lines `PREFIX END` (END in
//! Unix seconds, 0: never), and a trailer `end CRC` (CRC-32 of the entry lines): anything
//! else is refused as corrupt with one line. Journal: a header `xdp-lb deny journal 1 gen G`
//! naming the snapshot it follows, then one line per change, `+ END PREFIX...` or
//! `- PREFIX...`. A last line cut short by a crash was never acknowledged and is ignored with
//! a warning; a journal of another generation (a crash between writing a new snapshot and
//! starting its journal) is stale and ignored.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use crate::{Error, model::Prefix};

/// The node-wide deny list: prefix -> end (Unix seconds, 0: never).
pub type DenyList = BTreeMap<Prefix, u64>;

/// One change of the deny list: one journal line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyChange {
    /// `prefixes` added (or given a new end), all ending at `end`.
    Add { end: u64, prefixes: Vec<Prefix> },
    /// `prefixes` removed.
    Remove { prefixes: Vec<Prefix> },
}

/// The changes taking `old` to `new`: the removals, then the additions grouped by end. One
/// merge walk of both lists.
pub fn diff(old: &DenyList, new: &DenyList) -> Vec<DenyChange> {
    let mut removed = Vec::new();
    let mut added: BTreeMap<u64, Vec<Prefix>> = BTreeMap::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((p, _)), None) => {
                removed.push(**p);
                a.next();
            }
            (None, Some((p, e))) => {
                added.entry(**e).or_default().push(**p);
                b.next();
            }
            (Some((pa, ea)), Some((pb, eb))) => match pa.cmp(pb) {
                std::cmp::Ordering::Less => {
                    removed.push(**pa);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    added.entry(**eb).or_default().push(**pb);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if ea != eb {
                        added.entry(**eb).or_default().push(**pb);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    let mut out = Vec::new();
    if !removed.is_empty() {
        out.push(DenyChange::Remove { prefixes: removed });
    }
    out.extend(
        added
            .into_iter()
            .map(|(end, prefixes)| DenyChange::Add { end, prefixes }),
    );
    out
}

/// Applies `changes` to `list` in order.
pub fn apply(list: &mut DenyList, changes: &[DenyChange]) {
    for c in changes {
        match c {
            DenyChange::Add { end, prefixes } => list.extend(prefixes.iter().map(|p| (*p, *end))),
            DenyChange::Remove { prefixes } => prefixes.iter().for_each(|p| {
                list.remove(p);
            }),
        }
    }
}

/// The journal lines of `changes`.
fn encode_changes(changes: &[DenyChange]) -> String {
    let mut out = String::new();
    for c in changes {
        let prefixes = match c {
            DenyChange::Add { end, prefixes } => {
                let _ = write!(out, "+ {end}");
                prefixes
            }
            DenyChange::Remove { prefixes } => {
                out.push('-');
                prefixes
            }
        };
        for p in prefixes {
            let _ = write!(out, " {p}");
        }
        out.push('\n');
    }
    out
}

/// One journal line (without its newline).
fn decode_change(line: &str) -> Result<DenyChange, String> {
    let mut words = line.split(' ');
    let prefixes = |words: std::str::Split<'_, char>| {
        words
            .map(|w| w.parse::<Prefix>())
            .collect::<Result<Vec<_>, _>>()
    };
    match words.next() {
        Some("+") => {
            let end = words
                .next()
                .and_then(|e| e.parse().ok())
                .ok_or("an addition without its end")?;
            Ok(DenyChange::Add {
                end,
                prefixes: prefixes(words)?,
            })
        }
        Some("-") => Ok(DenyChange::Remove {
            prefixes: prefixes(words)?,
        }),
        _ => Err("neither an addition (+) nor a removal (-)".into()),
    }
}

/// The snapshot's checksum of `bytes`: CRC-32 (crc32fast, already in the tree through
/// aya's object parser) catches a torn or bit-flipped file, which is all it is for.
fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The snapshot file's text for `list`, generation `gen`.
fn encode_snapshot(list: &DenyList, gen_: u64) -> String {
    let mut body = String::with_capacity(list.len() * 24);
    for (p, end) in list {
        let _ = writeln!(body, "{p} {end}");
    }
    format!(
        "xdp-lb deny snapshot 1 gen {gen_} count {}\n{body}end {:08x}\n",
        list.len(),
        checksum(body.as_bytes())
    )
}

/// The list and generation a snapshot's text holds.
fn decode_snapshot(text: &str) -> Result<(DenyList, u64), String> {
    let (header, rest) = text.split_once('\n').ok_or("no header line")?;
    let h: Vec<&str> = header.split(' ').collect();
    let (gen_, count) = match h.as_slice() {
        ["xdp-lb", "deny", "snapshot", "1", "gen", g, "count", n] => (
            g.parse::<u64>().map_err(|_| "a bad generation")?,
            n.parse::<usize>().map_err(|_| "a bad count")?,
        ),
        _ => return Err(format!("not a deny list snapshot (header `{header}`)")),
    };
    let body_end = rest.rfind("end ").ok_or("no trailer (cut short?)")?;
    let (body, trailer) = rest.split_at(body_end);
    let sum = trailer
        .strip_prefix("end ")
        .and_then(|t| t.strip_suffix('\n'))
        .and_then(|t| u32::from_str_radix(t, 16).ok())
        .ok_or("a bad trailer")?;
    if sum != checksum(body.as_bytes()) {
        return Err("its checksum does not match its entries".into());
    }
    let mut list = DenyList::new();
    for (i, line) in body.lines().enumerate() {
        let (p, end) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {}: expected PREFIX END", i + 2))?;
        let p: Prefix = p.parse().map_err(|e| format!("line {}: {e}", i + 2))?;
        let end = end
            .parse()
            .map_err(|_| format!("line {}: a bad end `{end}`", i + 2))?;
        list.insert(p, end);
    }
    if list.len() != count {
        return Err(format!("it says {count} entries and holds {}", list.len()));
    }
    Ok((list, gen_))
}

/// The journal's header for generation `gen`.
fn journal_header(gen_: u64) -> String {
    format!("xdp-lb deny journal 1 gen {gen_}\n")
}

/// What the files hold, as last read or written.
#[derive(Default)]
struct Files {
    gen_: u64,
    snapshot_len: u64,
    journal_len: u64,
    /// The next save writes a snapshot: no journal to append to yet, or an append failed
    /// part of the way.
    compact: bool,
}

/// A journal may grow to the snapshot's size, and at least this much, before it is folded.
const MIN_JOURNAL: u64 = 256 << 10;

/// The deny list's two files.
pub struct DenyFiles {
    snapshot: PathBuf,
    journal: PathBuf,
    files: Mutex<Files>,
}

impl DenyFiles {
    /// The files beside the state file `state` (`IFACE.deny`, `IFACE.deny.journal`).
    pub fn beside(state: &Path) -> Self {
        DenyFiles {
            snapshot: state.with_extension("deny"),
            journal: state.with_extension("deny.journal"),
            files: Mutex::new(Files {
                compact: true,
                ..Files::default()
            }),
        }
    }

    pub fn snapshot_path(&self) -> &Path {
        &self.snapshot
    }

    pub fn journal_path(&self) -> &Path {
        &self.journal
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The saved list (snapshot, then the journal's changes), or `None` when neither file
    /// exists.
    pub fn load(&self) -> Result<Option<DenyList>, Error> {
        let corrupt = |path: &Path, why: String| {
            Error::Invalid(format!(
                "deny list {} is corrupt ({why}): fix or remove it",
                path.display()
            ))
        };
        let snapshot = read_if_any(&self.snapshot)?;
        let journal = read_if_any(&self.journal)?;
        if snapshot.is_none() && journal.is_none() {
            return Ok(None);
        }
        let Some(snapshot) = snapshot else {
            return Err(Error::Invalid(format!(
                "deny list {} is missing while its journal {} exists: restore it or remove the journal",
                self.snapshot.display(),
                self.journal.display()
            )));
        };
        let (mut list, gen_) =
            decode_snapshot(&snapshot).map_err(|e| corrupt(&self.snapshot, e))?;
        let mut files = self.lock();
        files.gen_ = gen_;
        files.snapshot_len = snapshot.len() as u64;
        files.compact = true;
        let Some(text) = journal else {
            return Ok(Some(list));
        };
        let (header, rest) = text.split_once('\n').unwrap_or((&text, ""));
        if format!("{header}\n") != journal_header(gen_) {
            log::warn!(
                "ignoring deny journal {}: it does not follow snapshot generation {gen_} (`{header}`)",
                self.journal.display()
            );
            return Ok(Some(list));
        }
        let lines: Vec<&str> = rest.split_inclusive('\n').collect();
        let mut good = header.len() as u64 + 1;
        for (i, line) in lines.iter().enumerate() {
            let last = i + 1 == lines.len();
            let change = line
                .strip_suffix('\n')
                .ok_or_else(|| "cut short".to_string())
                .and_then(decode_change);
            match change {
                Ok(c) => apply(&mut list, &[c]),
                Err(why) if last => {
                    log::warn!(
                        "ignoring the last record of deny journal {} ({why}): a change never acknowledged",
                        self.journal.display()
                    );
                    break;
                }
                Err(why) => {
                    return Err(corrupt(&self.journal, format!("line {}: {why}", i + 2)));
                }
            }
            good += line.len() as u64;
        }
        // A torn tail is cut off by the next append.
        files.journal_len = good;
        files.compact = false;
        Ok(Some(list))
    }

    /// Saves `changes`, which take the saved list to `full()`: one synced append to the
    /// journal, or a new snapshot of `full()` when the journal would outgrow it. On error the
    /// saved list is the one before.
    pub fn save<'a>(
        &self,
        changes: &[DenyChange],
        full: &dyn Fn() -> std::borrow::Cow<'a, DenyList>,
    ) -> Result<(), Error> {
        if changes.is_empty() {
            return Ok(());
        }
        let record = encode_changes(changes);
        let mut files = self.lock();
        let room = files.snapshot_len.max(MIN_JOURNAL);
        if !files.compact && files.journal_len + record.len() as u64 <= room {
            return self.append(&mut files, record.as_bytes());
        }
        self.compact(&mut files, &full())
    }

    /// Saves `full` as the whole list (a new snapshot).
    pub fn replace(&self, full: &DenyList) -> Result<(), Error> {
        self.compact(&mut self.lock(), full)
    }

    fn append(&self, files: &mut Files, record: &[u8]) -> Result<(), Error> {
        let what = || format!("appending to {}", self.journal.display());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.journal)
            .map_err(Error::io(what()))?;
        // Appends start where the last good record ends: a record cut short by a crash or
        // a failed write is cut off first.
        let written = f
            .set_len(files.journal_len)
            .and_then(|()| f.write_all(record))
            .and_then(|()| f.sync_data());
        match written {
            Ok(()) => {
                files.journal_len += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = f.set_len(files.journal_len);
                Err(Error::io(what())(e))
            }
        }
    }

    /// Writes `full` as the next generation's snapshot, then an empty journal for it.
    fn compact(&self, files: &mut Files, full: &DenyList) -> Result<(), Error> {
        let gen_ = files.gen_ + 1;
        let text = encode_snapshot(full, gen_);
        write_atomic(&self.snapshot, "deny.tmp", text.as_bytes())?;
        // The snapshot is in place: the change counts as saved, and the old journal (of the
        // previous generation) is ignored from here on.
        files.gen_ = gen_;
        files.snapshot_len = text.len() as u64;
        let header = journal_header(gen_);
        match write_atomic(&self.journal, "deny.journal.tmp", header.as_bytes()) {
            Ok(()) => {
                files.journal_len = header.len() as u64;
                files.compact = false;
            }
            Err(e) => {
                log::warn!("{e}: the next deny list change writes a snapshot again");
                files.compact = true;
            }
        }
        Ok(())
    }
}

fn read_if_any(path: &Path) -> Result<Option<String>, Error> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()))(e)),
    }
}

/// Writes `bytes` as the whole of `path` (mode 0600): a temporary file with extension
/// `tmp_ext`, synced, renamed into place, and the directory synced.
pub(super) fn write_atomic(path: &Path, tmp_ext: &str, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let tmp = path.with_extension(tmp_ext);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", tmp.display()))(e));
    }
    std::fs::rename(&tmp, path).map_err(Error::io(format!("renaming onto {}", path.display())))?;
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        log::warn!("syncing {}: {e}", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
