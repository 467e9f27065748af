//! One accept loop for every listener the agent has: at most `max_conns` connections at once
//! (extra ones are accepted and closed at once, so the backlog never fills with clients that
//! wait forever), a deadline to send request headers (slowloris), a cap on a connection's
//! life, and a pause after a failed accept (EMFILE would otherwise spin a core).
use std::{future::Future, sync::Arc, time::Duration};

use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Semaphore,
};

/// Limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_conns: usize,
    /// Time a client has to send a request's headers (also between keep-alive requests).
    pub header_timeout: Duration,
    /// Longest life of one connection.
    pub conn_timeout: Duration,
}

impl Limits {
    pub const API: Limits = Limits {
        max_conns: 64,
        header_timeout: Duration::from_secs(5),
        conn_timeout: Duration::from_secs(120),
    };
    /// Scrapes are answered from one shared snapshot (a copy of bytes each), so many
    /// scrapers and dashboards at once cost little: room for them all.
    pub const METRICS: Limits = Limits {
        max_conns: 128,
        header_timeout: Duration::from_secs(5),
        conn_timeout: Duration::from_secs(30),
    };
}

/// Serves connections from `accept` with `handle` until the task is dropped.
pub async fn serve<S, A, AF, H, HF, B>(mut accept: A, limits: Limits, what: &'static str, handle: H)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> AF,
    AF: Future<Output = std::io::Result<S>>,
    H: Fn(Request<Incoming>) -> HF + Clone + Send + Sync + 'static,
    HF: Future<Output = Response<B>> + Send + 'static,
    // A whole body (`Full`), or the API's capture stream.
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_conns));
    loop {
        let stream = match accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("{what}: accept failed: {e}; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            log::warn!(
                "{what}: {} connections open, refusing one",
                limits.max_conns
            );
            drop(stream);
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let h = handle.clone();
                async move { Ok::<_, std::convert::Infallible>(h(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(limits.conn_timeout, conn).await;
        });
    }
}
