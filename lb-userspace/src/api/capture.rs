//! `POST /v1/capture` (a capture streamed back, `crate::capture::wire`) and `GET
//! /v1/capture` (whether one runs, and the kernel's counters of the last one).
//!
//! The request is checked and resolved (VIP and backend to ids) under the agent's lock on a
//! blocking thread; the capture then runs on a blocking thread of its own with the
//! capture's maps only, so the agent's other work never waits for it.
use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Response, StatusCode,
    body::{Body, Bytes, Frame, Incoming},
};
use lb_common::{CAPTURE_F_BOTH, CAPTURE_MAX_SNAP, CaptureConfig, Stat};
use tokio::sync::mpsc;

use crate::{
    Error,
    agent::Agent,
    capture::{
        self, Capturer, Limits,
        wire::{CaptureRequest, CaptureStatus, KIND_START, Start, message},
    },
    model::{BackendAddr, VipAddr},
    protocol::MAX_BODY,
};

/// The longest capture: a connection to the API lives at most `Limits::API.conn_timeout`.
pub const MAX_DURATION: Duration = Duration::from_secs(110);

/// The streamed answer: framed messages from the capture's thread.
pub struct ChannelBody(mpsc::Receiver<Vec<u8>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|m| m.map(|v| Ok(Frame::data(Bytes::from(v)))))
    }
}

/// The kernel-side settings, the names of the ids and the limits of a request, checked.
fn resolve(
    agent: &Agent,
    req: &CaptureRequest,
) -> Result<(Arc<Capturer>, CaptureConfig, Start, Limits), Error> {
    let bad = |m: String| Err(Error::Invalid(m));
    let snaplen = match req.snaplen {
        0 => lb_common::CAPTURE_DEFAULT_SNAP,
        n if n <= CAPTURE_MAX_SNAP => n,
        n => return bad(format!("snap length {n}: at most {CAPTURE_MAX_SNAP} bytes")),
    };
    let duration = Duration::from_millis(req.duration_ms);
    if duration.is_zero() || duration > MAX_DURATION {
        return bad(format!(
            "duration {duration:?}: give 1 ms to {} s",
            MAX_DURATION.as_secs()
        ));
    }
    let max_rate = capture::checked_max_rate(req.max_rate)?;
    let verdicts = capture::checked_verdicts(req.verdict.as_deref())?;
    let names: Vec<&str> = Stat::ALL.iter().map(|s| s.name()).collect();
    let reason = capture::checked_reason(req.reason.as_deref(), &names)?;
    let core = agent.core();
    let capturer = core
        .kernel()
        .capture()
        .ok_or_else(|| Error::Unavailable("this agent has no data plane to capture".into()))?;
    let ids = core.ids();
    let vip = match &req.vip {
        None => None,
        Some(v) => {
            let addr: VipAddr = v.parse().map_err(Error::Invalid)?;
            let id = ids.vips.get(&addr).copied().ok_or_else(|| {
                Error::NotFound(format!("no VIP {addr} on this agent (see `lb vip list`)"))
            })?;
            Some((addr, id))
        }
    };
    let backend = match &req.backend {
        None => 0,
        Some(b) => {
            let addr: BackendAddr = b.parse().map_err(Error::Invalid)?;
            let found: Vec<u32> = ids
                .backends
                .iter()
                .filter(|(v, _)| vip.is_none_or(|(a, _)| a == **v))
                .filter_map(|(_, m)| m.get(&addr).copied())
                .collect();
            match found[..] {
                [id] => id + 1,
                [] => {
                    return Err(Error::NotFound(format!(
                        "no backend {addr}{} on this agent",
                        vip.map(|(a, _)| format!(" in VIP {a}")).unwrap_or_default()
                    )));
                }
                _ => return bad(format!("backend {addr} serves several VIPs: add --vip")),
            }
        }
    };
    // One limit for every CPU together: the ring gets at most the rate asked, whichever
    // CPUs the traffic lands on.
    let (window_ns, per_window) = capture::rate_window(max_rate);
    let cfg = CaptureConfig {
        on: 0,
        flags: if req.both { CAPTURE_F_BOTH } else { 0 },
        snaplen,
        sample: req.sample.max(1),
        verdicts,
        reason,
        vip: vip.map_or(0, |(_, id)| id + 1),
        backend,
        window_ns,
        per_window,
        until_ns: 0,
    };
    let start = Start {
        vips: ids
            .vips
            .iter()
            .map(|(a, id)| (*id, a.to_string()))
            .collect(),
        backends: ids
            .backends
            .values()
            .flat_map(|m| m.iter().map(|(a, id)| (*id, a.to_string())))
            .collect(),
        mono_to_unix_ns: capture::mono_to_unix_ns(),
        snaplen,
        max_rate,
        decap: false,
    };
    let limits = Limits {
        count: req.count,
        duration,
    };
    Ok((capturer, cfg, start, limits))
}

/// `POST /v1/capture`: `Ok` the stream, `Err` an error to answer with.
pub async fn start(agent: Arc<Agent>, body: Incoming) -> Result<Response<ChannelBody>, Error> {
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| Error::Invalid(format!("reading the request: {e}")))?
        .to_bytes();
    let req: CaptureRequest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("malformed capture request: {e}")))?;
    let (session, start, limits) = tokio::task::spawn_blocking(move || {
        let (capturer, cfg, start, limits) = resolve(&agent, &req)?;
        Ok::<_, Error>((capturer.begin(cfg)?, start, limits))
    })
    .await
    .map_err(|e| Error::Kernel(format!("the request did not finish: {e}")))??;
    let (tx, rx) = mpsc::channel(1024);
    let first = message(KIND_START, &serde_json::to_vec(&start).unwrap_or_default());
    // The channel is new and empty: room for the first message.
    let _ = tx.try_send(first);
    tokio::task::spawn_blocking(move || session.run(limits, tx));
    let mut resp = Response::new(ChannelBody(rx));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}

/// `GET /v1/capture`.
pub fn status(agent: &Agent) -> Result<CaptureStatus, Error> {
    let capturer = agent
        .core()
        .kernel()
        .capture()
        .ok_or_else(|| Error::Unavailable("this agent has no data plane to capture".into()))?;
    Ok(CaptureStatus {
        running: capturer.running(),
        counts: capturer.counts()?,
    })
}

/// A full body as the stream's type, for one answer type on the socket.
pub fn full(
    resp: Response<Full<Bytes>>,
) -> Response<http_body_util::Either<Full<Bytes>, ChannelBody>> {
    resp.map(http_body_util::Either::Left)
}
