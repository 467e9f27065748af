//! The node's drain (`lb node drain|undrain`), kept in a small file beside the state file so
//! it survives an agent restart: a drained node restarted for an upgrade stays out.
use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{Error, announce::gate::DrainPhase};

/// A drain in progress or done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// When it began, milliseconds since the epoch (a drain time of a few seconds is kept
    /// to the millisecond, not cut short by a second's rounding).
    pub since_unix_ms: u64,
    /// Seconds announced with the graceful-shutdown community before the withdrawal.
    pub withdraw_after_s: u64,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Drain {
    /// Where the drain is at `now_ms`, and how long until the withdrawal.
    pub fn phase(&self, now_ms: u64) -> (DrainPhase, Duration) {
        let end = self
            .since_unix_ms
            .saturating_add(self.withdraw_after_s.saturating_mul(1000));
        if now_ms >= end {
            (DrainPhase::Drained, Duration::ZERO)
        } else {
            (DrainPhase::Draining, Duration::from_millis(end - now_ms))
        }
    }
}

/// The saved drain (`None`: no file, not draining). Blocking.
pub fn load(path: &Path) -> Result<Option<Drain>, Error> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::Invalid(format!(
                "{}: not a drain state ({e}); remove it to undrain",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()))(e)),
    }
}

/// Saves `drain` (or removes the file for `None`), durably: written aside, synced, renamed.
/// Blocking.
pub fn save(path: &Path, drain: Option<&Drain>) -> Result<(), Error> {
    let what = || format!("saving the drain state {}", path.display());
    match drain {
        None => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(what())(e)),
        },
        Some(d) => {
            let tmp = path.with_extension("tmp");
            let bytes = serde_json::to_vec(d).map_err(|e| Error::Invalid(e.to_string()))?;
            (|| {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, path)
            })()
            .map_err(Error::io(what()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_withdraws_when_its_time_is_up_and_survives_a_reload() {
        let d = Drain {
            since_unix_ms: 1_000_000,
            withdraw_after_s: 30,
        };
        assert_eq!(
            d.phase(1_010_000),
            (DrainPhase::Draining, Duration::from_secs(20))
        );
        assert_eq!(d.phase(1_029_999).0, DrainPhase::Draining);
        assert_eq!(d.phase(1_030_000).0, DrainPhase::Drained);
        let dir = std::env::temp_dir().join(format!("lb-drain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("drain.json");
        save(&p, Some(&d)).unwrap();
        assert_eq!(load(&p).unwrap(), Some(d));
        save(&p, None).unwrap();
        assert_eq!(load(&p).unwrap(), None);
        std::fs::write(&p, b"{").unwrap();
        assert!(load(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
