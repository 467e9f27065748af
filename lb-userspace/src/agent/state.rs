//! Where the desired state and ids are kept between runs: a JSON file written atomically
//! (temporary file, fsync, rename, fsync of the directory), and the node's deny list in its
//! own files ([`super::deny_file`]), behind a small trait so the reconciler's tests can
//! inject failures. Writes are blocking: the agent makes them on a
//! blocking thread, never on an async worker and never while holding its state lock.
use std::{
    borrow::Cow,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    Error,
    agent::{
        deny_file::{DenyChange, DenyFiles, DenyList},
        reconcile::Ids,
    },
    model::{DesiredState, VipAddr, VipSpec},
};

/// What the state file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    pub desired: DesiredState,
    pub ids: Ids,
    /// In store mode (`lb run --store`): the configuration revision `desired` was read at,
    /// so a restarted node says which revision it serves until it has caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_revision: Option<i64>,
}

/// Durable storage of [`StateFile`].
pub trait StateStore: Send + Sync {
    /// The saved state (the node's deny list included), or the default when there is none
    /// yet.
    fn load(&self) -> Result<StateFile, Error>;
    /// Replaces the saved state but for the node's deny list (`desired.deny` is not read:
    /// [`StateStore::save_deny`] keeps it); on error the previous one is intact.
    fn save(&self, state: &StateFile) -> Result<(), Error>;
    /// Saves `changes` to the node's deny list, which take it to `full()`; on error the
    /// previous list is intact. `full` is called only when the whole list is written (the
    /// journal has grown to the snapshot's size), so a change of one prefix in a list of a
    /// million does not make the list for every save.
    fn save_deny<'a>(
        &self,
        changes: &[DenyChange],
        full: &dyn Fn() -> Cow<'a, DenyList>,
    ) -> Result<(), Error>;
    /// The second-chance history the last run saved ([`crate::agent::second_chance::saved`]), if
    /// any.
    fn load_history(&self) -> Result<Option<Vec<u8>>, Error> {
        Ok(None)
    }
    /// Replaces the saved second-chance history; on error the previous one is intact.
    fn save_history(&self, _bytes: &[u8]) -> Result<(), Error> {
        Ok(())
    }
}

/// The state file as written: all of [`StateFile`] but the deny list, borrowed.
#[derive(Serialize)]
struct Written<'a> {
    desired: WrittenDesired<'a>,
    ids: &'a Ids,
    #[serde(skip_serializing_if = "Option::is_none")]
    store_revision: Option<i64>,
}

#[derive(Serialize)]
struct WrittenDesired<'a> {
    vips: &'a std::collections::BTreeMap<VipAddr, VipSpec>,
}

/// The state file on disk, with the deny list's files beside it.
pub struct FileStore {
    path: PathBuf,
    deny: DenyFiles,
}

impl FileStore {
    pub fn new(path: &Path) -> Self {
        FileStore {
            path: path.to_path_buf(),
            deny: DenyFiles::beside(path),
        }
    }

    /// The state file as saved, the deny list as the state file holds it (builds before the
    /// deny list had its own files kept it there).
    fn load_state(&self) -> Result<StateFile, Error> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::Invalid(format!(
                    "state file {} is corrupt ({e}): fix or remove it",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
            Err(e) => Err(Error::io(format!("reading {}", self.path.display()))(e)),
        }
    }

    /// The second-chance history beside the state file (`IFACE.second-chance`).
    fn history_path(&self) -> PathBuf {
        self.path.with_extension("second-chance")
    }

    /// Where builds before the rename kept it (`IFACE.chance`): read when the new file is
    /// absent, so an upgrade keeps the history; the next save writes the new name.
    fn old_history_path(&self) -> PathBuf {
        self.path.with_extension("chance")
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<StateFile, Error> {
        let mut state = self.load_state()?;
        match self.deny.load()? {
            // The deny list's own files hold it: a list still in the state file is older.
            Some(list) => state.desired.deny = list,
            None if !state.desired.deny.is_empty() => {
                // A state file of a build before these files: its list moves out now (the
                // next save leaves it out of the state file).
                self.deny.replace(&state.desired.deny)?;
                log::info!(
                    "moved the deny list ({} entries) out of {} into {}",
                    state.desired.deny.len(),
                    self.path.display(),
                    self.deny.snapshot_path().display()
                );
            }
            None => {}
        }
        Ok(state)
    }

    fn save_deny<'a>(
        &self,
        changes: &[DenyChange],
        full: &dyn Fn() -> Cow<'a, DenyList>,
    ) -> Result<(), Error> {
        self.deny.save(changes, full)
    }

    fn save(&self, state: &StateFile) -> Result<(), Error> {
        let path = &self.path;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let tmp = path.with_extension("json.tmp");
        let written = Written {
            desired: WrittenDesired {
                vips: &state.desired.vips,
            },
            ids: &state.ids,
            store_revision: state.store_revision,
        };
        let text = serde_json::to_vec_pretty(&written)
            .map_err(|e| Error::Invalid(format!("serializing state: {e}")))?;
        if let Err(e) = write_private(&tmp, &text, true) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(format!("writing {}", tmp.display()))(e));
        }
        std::fs::rename(&tmp, path)
            .map_err(Error::io(format!("renaming onto {}", path.display())))?;
        // The new file is in place: from here on the change counts as saved. A failed
        // directory sync only risks losing it to a power cut, so it is logged, not returned
        // (returning it would make the caller roll back a change the file already holds).
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            log::warn!("syncing {}: {e}", dir.display());
        }
        Ok(())
    }

    fn load_history(&self) -> Result<Option<Vec<u8>>, Error> {
        for path in [self.history_path(), self.old_history_path()] {
            match std::fs::read(&path) {
                Ok(bytes) => return Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
            }
        }
        Ok(None)
    }

    /// Written whole and renamed into place, without fsync: the history describes the kernel's
    /// tables, which a power cut loses too, while a killed agent's writes survive in the page
    /// cache.
    fn save_history(&self, bytes: &[u8]) -> Result<(), Error> {
        let path = self.history_path();
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let tmp = path.with_extension("second-chance.tmp");
        if let Err(e) = write_private(&tmp, bytes, false) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(format!("writing {}", tmp.display()))(e));
        }
        std::fs::rename(&tmp, &path)
            .map_err(Error::io(format!("renaming onto {}", path.display())))?;
        let _ = std::fs::remove_file(self.old_history_path());
        Ok(())
    }
}

/// Writes `bytes` as the whole of `path`, mode 0600 (the state names every backend; only root
/// reads it), synced to disk when `sync`.
fn write_private(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    if sync { f.sync_all() } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_file_of_the_landed_release_keeps_its_denies_and_the_next_save_moves_them_out() {
        let dir = std::env::temp_dir().join(format!("lb-state-upgrade-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb0.json");
        // As the landed release wrote it: the whole `StateFile`, deny list inside.
        let mut state = StateFile::default();
        let vip: VipAddr = "10.0.0.10:80/tcp".parse().unwrap();
        state.desired.vips.insert(vip, VipSpec::default());
        state.ids.vips.insert(vip, 0);
        state
            .desired
            .deny
            .insert("192.0.2.0/24".parse().unwrap(), 0);
        state
            .desired
            .deny
            .insert("2001:db8::/64".parse().unwrap(), 1_900_000_000);
        std::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("192.0.2.0/24")
        );
        let store = FileStore::new(&path);
        let loaded = store.load().unwrap();
        assert_eq!(loaded, state, "loaded with its denies kept");
        assert!(dir.join("lb0.deny").exists(), "moved out at the load");
        // The next save leaves the list out of the state file; it loads back whole.
        store.save(&loaded).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("deny"), "{text}");
        assert_eq!(FileStore::new(&path).load().unwrap(), loaded);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
