//! `lb decap --capture`: a capture of the backend's decap program (`lb_decap`), run by the
//! `lb decap` process itself. `lb decap` attaches through a pinned link and exits, so no
//! process of it stays to be asked, as the agent is by `lb capture`: the capturing process
//! opens the attached program's capture maps instead (the pinned link's program, its maps by
//! id, matched by name: they are unpinned, so a program attached by a later `lb decap` is
//! never read through stale pins), and runs the same [`Session`] as the agent, with the same
//! lease (a killed capture stops in the kernel within two seconds). One capture at a time
//! per interface: an exclusive `flock` on the interface's pin directory.
use std::{fs::File, os::fd::AsRawFd as _, path::Path, sync::Arc, time::Duration};

use aya::{
    maps::{Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use lb_common::{
    BSS_MAP, CAPTURE_F_BOTH, CAPTURE_MAX_SNAP, CaptureConfig, DECAP_CAPTURE_CONFIG_MAP,
    DECAP_CAPTURE_CPU_MAP, DECAP_CAPTURE_RATE_MAP, DECAP_CAPTURE_RING_MAP, DecapStat,
};

use super::{Capturer, Limits, Session, mono_to_unix_ns, wire::Start};
use crate::Error;

/// What to capture: the options of `lb capture` that apply to the decap program.
#[derive(Clone, Debug, Default)]
pub struct DecapCaptureRequest {
    /// Stop after this many packets (0: no limit).
    pub count: u64,
    pub duration: Duration,
    /// 0: the default.
    pub snaplen: u32,
    /// `forwarded` (second chance sent it on), `passed` (stripped and kept, or untouched) or
    /// `dropped` (an untrusted sender).
    pub verdict: Option<String>,
    /// A `lb decap --stats` row.
    pub reason: Option<String>,
    /// One matching packet in N.
    pub sample: u32,
    pub both: bool,
    /// 0: the default.
    pub max_rate: u32,
}

/// A running decap capture: the session and the claim on the interface.
pub struct DecapCapture {
    pub session: Session,
    pub start: Start,
    pub limits: Limits,
    /// Held (locked) for the capture's life: drop it after the session.
    pub claim: File,
}

/// The kernel-side settings of a request, checked.
pub fn config(req: &DecapCaptureRequest) -> Result<(CaptureConfig, Start, Limits), Error> {
    let bad = |m: String| Err(Error::Invalid(m));
    let snaplen = match req.snaplen {
        0 => lb_common::CAPTURE_DEFAULT_SNAP,
        n if n <= CAPTURE_MAX_SNAP => n,
        n => return bad(format!("--snaplen {n}: give 1 to {CAPTURE_MAX_SNAP} bytes")),
    };
    if req.duration.is_zero() {
        return bad("the duration must be positive".into());
    }
    let max_rate = super::checked_max_rate(req.max_rate)?;
    let verdicts = super::checked_verdicts(req.verdict.as_deref())?;
    let names: Vec<&str> = DecapStat::ALL.iter().map(|s| s.name()).collect();
    let reason = super::checked_reason(req.reason.as_deref(), &names)?;
    let (window_ns, per_window) = super::rate_window(max_rate);
    let cfg = CaptureConfig {
        on: 0,
        flags: if req.both { CAPTURE_F_BOTH } else { 0 },
        snaplen,
        sample: req.sample.max(1),
        verdicts,
        reason,
        vip: 0,
        backend: 0,
        // One limit for every CPU together, as the agent's capture.
        window_ns,
        per_window,
        until_ns: 0,
    };
    let start = Start {
        mono_to_unix_ns: mono_to_unix_ns(),
        snaplen,
        max_rate,
        decap: true,
        ..Start::default()
    };
    let limits = Limits {
        count: req.count,
        duration: req.duration,
    };
    Ok((cfg, start, limits))
}

/// Starts capturing from the decap program attached (at XDP) to `iface`.
pub fn begin(iface: &str, bpffs: &Path, req: &DecapCaptureRequest) -> Result<DecapCapture, Error> {
    let (cfg, start, limits) = config(req)?;
    let dir = crate::decap::pin_dir(bpffs, iface);
    if dir.join("tc-link").exists() {
        return Err(Error::Invalid(format!(
            "decap runs at tc on {iface}: --capture records the xdp program (attach with \
             --attach xdp)"
        )));
    }
    let link = dir.join("link");
    if !link.exists() {
        return Err(Error::NotFound(format!(
            "no decap program is attached to {iface} (no link at {})",
            link.display()
        )));
    }
    let claim = claim(&dir, iface)?;
    let capturer = Arc::new(open_maps(&link, iface)?);
    let session = capturer.begin(cfg)?;
    Ok(DecapCapture {
        session,
        start,
        limits,
        claim,
    })
}

/// The one-at-a-time claim: an exclusive lock on the interface's pin directory (a second
/// capturing process would take records off the same ring).
fn claim(dir: &Path, iface: &str) -> Result<File, Error> {
    let f = File::open(dir).map_err(Error::io(format!("opening {}", dir.display())))?;
    // SAFETY: a valid descriptor of ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Conflict(format!(
            "another `lb decap --capture` runs on {iface}: one at a time; wait for it to end"
        )));
    }
    Ok(f)
}

/// The capture maps of the program behind the pinned link `link`.
fn open_maps(link: &Path, iface: &str) -> Result<Capturer, Error> {
    let kernel = |what: &str, e: &dyn std::fmt::Display| Error::Kernel(format!("{what}: {e}"));
    let pinned = PinnedLink::from_pin(link).map_err(|e| kernel("opening the decap link", &e))?;
    let prog_id = FdLink::from(pinned)
        .info()
        .map_err(|e| kernel("reading the decap link", &e))?
        .program_id();
    let prog = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .ok_or_else(|| Error::Kernel(format!("the decap program (id {prog_id}) is gone")))?;
    let ids = prog
        .map_ids()
        .map_err(|e| kernel("reading the decap program's maps", &e))?
        .unwrap_or_default();
    // The shared rate limit's map marks a program whose settings mean what this build
    // writes (one before it read the same bytes as a per-CPU interval and burst).
    let (mut config, mut cpus, mut ring, mut bss, mut rate) = (None, None, None, None, false);
    for id in ids {
        let Ok(data) = MapData::from_id(id) else {
            continue;
        };
        let Ok(info) = data.info() else { continue };
        match info.name_as_str().unwrap_or("") {
            DECAP_CAPTURE_CONFIG_MAP => config = Some(Map::Array(data)),
            DECAP_CAPTURE_CPU_MAP => cpus = Some(Map::PerCpuArray(data)),
            DECAP_CAPTURE_RING_MAP => ring = Some(Map::RingBuf(data)),
            DECAP_CAPTURE_RATE_MAP => rate = true,
            n if n.ends_with(BSS_MAP) => bss = Some(Map::Array(data)),
            _ => {}
        }
    }
    match (config, cpus, ring, bss) {
        (Some(c), Some(p), Some(r), Some(b)) if rate => Capturer::from_maps(c, p, r, b),
        _ => Err(Error::Unavailable(format!(
            "the decap program on {iface} cannot capture (attached by an older lb): run `lb \
             decap` again to replace it, then capture"
        ))),
    }
}
