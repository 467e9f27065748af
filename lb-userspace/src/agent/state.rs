//! Where the desired state and ids are kept between runs: a JSON file written atomically
//! (temporary file, fsync, rename, fsync of the directory), behind a small trait so the
//! reconciler's tests can inject failures. Writes are blocking: the agent makes them on a
//! blocking thread, never on an async worker and never while holding its state lock.
use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{Error, agent::reconcile::Ids, model::DesiredState};

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
    /// The saved state, or the default when there is none yet.
    fn load(&self) -> Result<StateFile, Error>;
    /// Replaces the saved state; on error the previous one is intact.
    fn save(&self, state: &StateFile) -> Result<(), Error>;
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

/// The state file on disk.
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: &Path) -> Self {
        FileStore {
            path: path.to_path_buf(),
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

    fn save(&self, state: &StateFile) -> Result<(), Error> {
        let path = &self.path;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(state)
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
