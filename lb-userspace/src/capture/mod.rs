//! `lb capture` on the agent's side: the program's capture maps (`lb_common::capture`), one
//! capture at a time, read on a blocking thread of its own and streamed to the client
//! ([`wire`]). The maps are the capture's own, apart from the agent's tables: a capture
//! never takes the agent's lock after it has started.
pub mod decap;
pub mod pcapng;
pub mod wire;

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuValues, RingBuf};
use lb_common::{CAPTURE_ARRIVED, CAPTURE_LEFT, CaptureConfig, CaptureCpu, CaptureHeader};
use tokio::sync::mpsc;

use crate::Error;
use wire::{End, KIND_END, KIND_PROGRESS, KIND_RECORD, Progress, message};

/// The agent's packets per second reaching it when the client names no `--max-rate`.
pub const DEFAULT_MAX_RATE: u32 = 10_000;
/// The most packets per second a capture may ask for.
pub const MAX_RATE: u32 = 1_000_000;
/// The rate limit's window: a capture's records may come a tenth of a second's worth at once.
pub const RATE_WINDOW: Duration = Duration::from_millis(100);

/// The kernel's rate limit for `max_rate` packets a second (`lb_common::rate_step`): the
/// window in nanoseconds and the records each lets through, for all CPUs together. A rate
/// under ten a second gets a longer window, so each window lets at least one through.
pub fn rate_window(max_rate: u32) -> (u64, u64) {
    const SECOND: u64 = 1_000_000_000;
    let rate = u64::from(max_rate.max(1));
    let window = (RATE_WINDOW.as_nanos() as u64).max(SECOND.div_ceil(rate));
    (window, (rate * window / SECOND).max(1))
}

/// A request's `--max-rate` checked (0: the default); the agent's and `lb decap`'s alike.
pub fn checked_max_rate(r: u32) -> Result<u32, Error> {
    match r {
        0 => Ok(DEFAULT_MAX_RATE),
        r if r <= MAX_RATE => Ok(r),
        r => Err(Error::Invalid(format!(
            "--max-rate {r}: at most {MAX_RATE} packets a second"
        ))),
    }
}

/// A request's `--verdict` as the kernel's filter bits (none: every verdict).
pub fn checked_verdicts(v: Option<&str>) -> Result<u32, Error> {
    match v {
        None => Ok(0),
        Some(v) => wire::verdict_bits(v).ok_or_else(|| {
            Error::Invalid(format!("verdict `{v}`: give forwarded, passed or dropped"))
        }),
    }
}

/// A request's `--reason` as the kernel's filter (its index among `names`, plus one; none:
/// every reason).
pub fn checked_reason(r: Option<&str>, names: &[&str]) -> Result<u32, Error> {
    match r {
        None => Ok(0),
        Some(r) => match names.iter().position(|n| *n == r) {
            Some(i) => Ok(i as u32 + 1),
            None => Err(Error::Invalid(format!(
                "reason `{r}`: give one of {}",
                names.join(", ")
            ))),
        },
    }
}
/// How long the kernel keeps recording without the agent renewing the capture: a capture
/// whose agent died stops by itself.
const LEASE: Duration = Duration::from_secs(2);
/// How often the agent renews the lease and tells the client the counts (which is also how
/// it finds a client gone while nothing matches).
const TICK: Duration = Duration::from_millis(250);

/// The capture maps of the loaded program.
pub struct Capturer {
    /// The programs' flag ([`lb_common::CAPTURE_ON_GLOBAL`], alone in `.bss`).
    on: Mutex<Array<MapData, u32>>,
    config: Mutex<Array<MapData, CaptureConfig>>,
    cpus: Mutex<PerCpuArray<MapData, CaptureCpu>>,
    /// Taken by the running capture: the one-at-a-time claim.
    ring: Mutex<Option<RingBuf<MapData>>>,
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// A zeroed per-CPU state: no record pending, counters at zero.
fn zeroed_cpu() -> CaptureCpu {
    // SAFETY: `CaptureCpu` is plain integers and bytes; all zeros is a value.
    unsafe { std::mem::zeroed() }
}

impl Capturer {
    pub fn from_maps(config: Map, cpus: Map, ring: Map, bss: Map) -> Result<Self, Error> {
        use lb_common::{BSS_MAP, CAPTURE_CONFIG_MAP, CAPTURE_CPU_MAP, CAPTURE_RING_MAP};
        Ok(Capturer {
            // A `u32` value: the flag is the section's only global (another would change
            // its size, and the object is then refused at load, naming the map).
            on: Mutex::new(Array::try_from(bss).map_err(map_err(BSS_MAP))?),
            config: Mutex::new(Array::try_from(config).map_err(map_err(CAPTURE_CONFIG_MAP))?),
            cpus: Mutex::new(PerCpuArray::try_from(cpus).map_err(map_err(CAPTURE_CPU_MAP))?),
            ring: Mutex::new(Some(
                RingBuf::try_from(ring).map_err(map_err(CAPTURE_RING_MAP))?,
            )),
        })
    }

    fn write_flag(&self, on: bool) -> Result<(), Error> {
        let mut m = self.on.lock().unwrap_or_else(|p| p.into_inner());
        m.set(0, u32::from(on), 0)
            .map_err(map_err(lb_common::BSS_MAP))
    }

    fn write_config(&self, cfg: &CaptureConfig) -> Result<(), Error> {
        let mut m = self.config.lock().unwrap_or_else(|p| p.into_inner());
        m.set(0, cfg, 0)
            .map_err(map_err(lb_common::CAPTURE_CONFIG_MAP))
    }

    /// The kernel's counters of the running (or last) capture, summed over CPUs.
    pub fn counts(&self) -> Result<Progress, Error> {
        let m = self.cpus.lock().unwrap_or_else(|p| p.into_inner());
        let per_cpu = m.get(&0, 0).map_err(map_err(lb_common::CAPTURE_CPU_MAP))?;
        Ok(per_cpu.iter().fold(Progress::default(), |p, c| Progress {
            emitted: p.emitted + c.emitted,
            missed: p.missed + c.missed,
            sampled_out: p.sampled_out + c.sampled_out,
        }))
    }

    /// Whether a capture runs now.
    pub fn running(&self) -> bool {
        self.ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Starts capturing with `cfg` (its `on` and lease are set here): takes the one claim,
    /// or refuses while another capture runs.
    pub fn begin(self: &Arc<Self>, mut cfg: CaptureConfig) -> Result<Session, Error> {
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                Error::Conflict(
                    "another capture is running on this agent: one at a time; wait for it to end"
                        .into(),
                )
            })?;
        let mut session = Session {
            cap: self.clone(),
            ring: Some(ring),
            cfg,
        };
        // Counters and pending records from the last capture go first, then the flag.
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs")(e))?;
        let zero = PerCpuValues::try_from(vec![zeroed_cpu(); cpus])
            .map_err(|e| Error::Kernel(format!("per-CPU capture state: {e}")))?;
        self.cpus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(0, zero, 0)
            .map_err(map_err(lb_common::CAPTURE_CPU_MAP))?;
        // Anything a previous capture left in the ring is not this one's.
        if let Some(r) = session.ring.as_mut() {
            while r.next().is_some() {}
        }
        cfg.on = 1;
        cfg.until_ns = monotonic_ns() + LEASE.as_nanos() as u64;
        self.write_config(&cfg)?;
        session.cfg = cfg;
        // Last: the programs copy and record only with the settings in place.
        self.write_flag(true)?;
        Ok(session)
    }
}

pub use crate::clock::{mono_to_unix_ns, monotonic_ns};

/// The running capture. Dropping it turns the kernel side off and frees the claim.
pub struct Session {
    cap: Arc<Capturer>,
    ring: Option<RingBuf<MapData>>,
    cfg: CaptureConfig,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(e) = self.cap.write_flag(false) {
            log::warn!("capture: turning it off: {e}");
        }
        let off = CaptureConfig::default();
        if let Err(e) = self.cap.write_config(&off) {
            log::warn!("capture: turning it off: {e}");
        }
        *self.cap.ring.lock().unwrap_or_else(|p| p.into_inner()) = self.ring.take();
    }
}

/// When a capture ends.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Packets (0: no limit).
    pub count: u64,
    pub duration: Duration,
}

impl Session {
    /// Reads the ring until the count, the duration or the client (`tx` closed) ends the
    /// capture, sending each record to `tx`; then turns the kernel side off and sends the
    /// [`End`]. Blocking (poll on the ring, map writes): run it on a blocking thread.
    pub fn run(mut self, limits: Limits, tx: mpsc::Sender<Vec<u8>>) {
        let deadline = Instant::now() + limits.duration;
        let mut sent = 0u64;
        let mut packets = 0u64;
        let mut next_tick = Instant::now();
        let reason = loop {
            if tx.is_closed() {
                break "client gone";
            }
            let now = Instant::now();
            if now >= deadline {
                break "duration";
            }
            if now >= next_tick {
                next_tick = now + TICK;
                if let Some(r) = self.tick(&tx) {
                    break r;
                }
            }
            let wait = next_tick.min(deadline).saturating_duration_since(now);
            self.wait_readable(wait);
            match self.drain(&tx, limits.count, &mut packets, &mut sent) {
                Ok(true) => break "count",
                Ok(false) => {}
                Err(()) => break "client gone",
            }
        };
        let counts = self.cap.counts().unwrap_or_default();
        drop(self);
        let end = End {
            counts,
            sent,
            reason: reason.to_string(),
        };
        let _ = tx.blocking_send(message(
            KIND_END,
            &serde_json::to_vec(&end).unwrap_or_default(),
        ));
    }

    /// Renews the lease and sends the counts; `Some(reason)` when the capture must end.
    fn tick(&mut self, tx: &mpsc::Sender<Vec<u8>>) -> Option<&'static str> {
        self.cfg.until_ns = monotonic_ns() + LEASE.as_nanos() as u64;
        if let Err(e) = self.cap.write_config(&self.cfg) {
            log::warn!("capture: renewing: {e}");
            return Some("kernel error");
        }
        let counts = self.cap.counts().unwrap_or_default();
        let m = message(
            KIND_PROGRESS,
            &serde_json::to_vec(&counts).unwrap_or_default(),
        );
        tx.blocking_send(m).is_err().then_some("client gone")
    }

    fn wait_readable(&self, wait: Duration) {
        let Some(r) = self.ring.as_ref() else { return };
        let mut pfd = libc::pollfd {
            fd: r.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().clamp(1, 250) as i32;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    /// Sends every record in the ring; `Ok(true)` when `count` packets have been sent (their
    /// "left" records too), `Err` when the client is gone.
    fn drain(
        &mut self,
        tx: &mpsc::Sender<Vec<u8>>,
        count: u64,
        packets: &mut u64,
        sent: &mut u64,
    ) -> Result<bool, ()> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(true);
        };
        while let Some(item) = ring.next() {
            let Some((h, data)) = record_of(&item) else {
                continue;
            };
            if h.direction == CAPTURE_ARRIVED {
                if count != 0 && *packets >= count {
                    return Ok(true);
                }
                *packets += 1;
            }
            let mut payload = Vec::with_capacity(size_of::<CaptureHeader>() + data.len());
            payload.extend_from_slice(&item[..size_of::<CaptureHeader>()]);
            payload.extend_from_slice(data);
            drop(item);
            tx.blocking_send(message(KIND_RECORD, &payload))
                .map_err(|_| ())?;
            *sent += 1;
            // Without `--both` no "left" record follows the last packet.
            if count != 0 && *packets >= count && self.cfg.flags & lb_common::CAPTURE_F_BOTH == 0 {
                return Ok(true);
            }
            if h.direction == CAPTURE_LEFT && count != 0 && *packets >= count {
                return Ok(true);
            }
        }
        // A packet's "left" record is output right after its "arrived" one.
        Ok(count != 0 && *packets >= count)
    }
}

/// A ring item's header and the frame bytes it says it holds.
fn record_of(item: &[u8]) -> Option<(CaptureHeader, &[u8])> {
    let h_len = size_of::<CaptureHeader>();
    if item.len() < h_len {
        return None;
    }
    let mut h = CaptureHeader::default();
    // SAFETY: plain `#[repr(C)]` integers; `item` holds at least that many bytes.
    unsafe { std::ptr::copy_nonoverlapping(item.as_ptr(), (&raw mut h).cast::<u8>(), h_len) };
    let data = item.get(h_len..h_len + h.cap_len as usize)?;
    Some((h, data))
}

#[cfg(test)]
mod rate_tests {
    use super::rate_window;

    #[test]
    fn the_rate_window_lets_the_rate_through_and_at_least_one() {
        // A tenth of a second's share in each window of a tenth of a second.
        assert_eq!(rate_window(1000), (100_000_000, 100));
        assert_eq!(rate_window(1_000_000), (100_000_000, 100_000));
        // Under ten a second: a window of one packet's interval.
        assert_eq!(rate_window(4), (250_000_000, 1));
        assert_eq!(rate_window(1), (1_000_000_000, 1));
    }
}
