//! The metrics listener: `/metrics`, the status page and its JSON, `/healthz`, `/readyz`.
use std::sync::Arc;

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes};

use crate::{
    Error,
    api::{
        SharedNode,
        listen::{self, Limits},
        snapshot::Snapshots,
        status,
    },
};

/// Binds the metrics listener on `addr`. `lb run` calls it before anything is attached, so
/// a port in use refuses the start with nothing changed.
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::io(format!(
            "binding the metrics listener {addr} (is another process using that port? pick another --metrics)"
        ))(e)
    })
}

/// Serves, read-only, on `listener` until the task is dropped: `GET /metrics` (Prometheus
/// text), `/` (the status page) and its `/status.json`, `/healthz` (the agent answers) and
/// `/readyz` (503 while the kernel maps are not in line with the desired state).
pub fn serve(listener: tokio::net::TcpListener, node: SharedNode) -> tokio::task::JoinHandle<()> {
    let listener = Arc::new(listener);
    let snapshots = Arc::new(Snapshots::new(node.clone()));
    tokio::spawn(listen::serve(
        move || {
            let l = listener.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        },
        Limits::METRICS,
        "metrics",
        move |req: Request<hyper::body::Incoming>| {
            let node = node.clone();
            let snapshots = snapshots.clone();
            async move { route(req.uri().path(), &node, &snapshots).await }
        },
    ))
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

async fn route(path: &str, node: &SharedNode, snapshots: &Snapshots) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let failed = |e: String| reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, Bytes::from(e));
    match path {
        "/metrics" => match &snapshots.get().await.metrics {
            Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4", text.clone()),
            Err(e) => failed(e.clone()),
        },
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(status::PAGE.as_bytes()),
        ),
        "/status.json" => match &snapshots.get().await.status {
            Ok(body) => reply(StatusCode::OK, "application/json", body.clone()),
            Err(e) => failed(e.clone()),
        },
        "/healthz" => reply(StatusCode::OK, TEXT, Bytes::from_static(b"ok\n")),
        "/readyz" => {
            // The core's lock may be held by a change writing maps: wait for it on a
            // blocking thread, not on this worker.
            let a = node.agent().clone();
            let why =
                tokio::task::spawn_blocking(move || a.core().not_converged().map(str::to_string))
                    .await;
            match why {
                Ok(None) => reply(StatusCode::OK, TEXT, Bytes::from_static(b"ready\n")),
                Ok(Some(why)) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    Bytes::from(format!("not converged: {why}\n")),
                ),
                Err(e) => failed(e.to_string()),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            Bytes::from_static(b"see / (status page), /metrics, /healthz or /readyz\n"),
        ),
    }
}
