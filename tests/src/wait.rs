//! The one polling helper of the tests: wait until a condition holds, or fail saying what
//! was awaited and what was seen last.
use std::time::{Duration, Instant};

/// How often [`wait_until`] looks again.
pub const POLL: Duration = Duration::from_millis(25);

/// Polls `probe` every [`POLL`] until it returns `Ok(true)`; returns how long that took.
/// After `within`, fails with `what` and the last observation `seen` gives.
pub fn wait_until(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> anyhow::Result<bool>,
    seen: impl Fn() -> String,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if probe()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= within {
            anyhow::bail!("{what}: not within {within:?} (last seen: {})", seen());
        }
        std::thread::sleep(POLL);
    }
}
