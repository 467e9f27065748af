//! The API server: reads are GETs answered from the agent's memory and the counter maps;
//! every change is one `POST /v1/commands` carrying a [`Command`], which the node executes
//! (on a blocking thread: it writes the state file; in store mode through the fleet's store).
//! Every handler that takes the agent's lock does so on a blocking thread: a change holds it
//! while it writes maps, and an async worker waiting there would stall every connection.
use std::{collections::HashMap, net::IpAddr, path::Path, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, body::Incoming};
use serde::Serialize;
use tokio::net::UnixListener;

use crate::{
    Error, ErrorKind,
    agent::Agent,
    announce::DrainRequest,
    api::{
        capture,
        listen::{self, Limits},
    },
    model::VipAddr,
    node::Node,
    protocol::{ApiError, Command, CommandResult, MAX_BODY, MAX_COMMAND_BODY},
};

/// The node the API answers for, shared by every connection.
pub type SharedNode = Arc<Node>;

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value)
        .unwrap_or_else(|e| format!("{{\"kind\":\"io\",\"error\":\"{e}\"}}").into_bytes());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(e: &Error) -> Response<Full<Bytes>> {
    let kind = e.kind();
    json(
        StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &ApiError {
            kind,
            error: e.to_string(),
        },
    )
}

fn invalid(msg: impl Into<String>) -> Response<Full<Bytes>> {
    error(&Error::Invalid(msg.into()))
}

fn query(uri: &hyper::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.replace("%2F", "/")
                    .replace("%3A", ":")
                    .replace("%5B", "[")
                    .replace("%5D", "]"),
            )
        })
        .collect()
}

/// Runs `f` on a blocking thread (it takes the agent's lock, or reads maps).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Kernel(format!("the request did not finish: {e}")))
}

/// `f`'s answer as JSON, or its error.
async fn read<T: Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Response<Full<Bytes>> {
    match blocking(f).await.and_then(|r| r) {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => error(&e),
    }
}

async fn trace(agent: Arc<Agent>, uri: &hyper::Uri) -> Response<Full<Bytes>> {
    let q = query(uri);
    let parsed = (|| -> Result<(IpAddr, u16, VipAddr, Option<u16>), String> {
        let src = q
            .get("src")
            .ok_or("missing src")?
            .parse()
            .map_err(|_| "bad src address")?;
        let sport = q
            .get("sport")
            .ok_or("missing sport")?
            .parse()
            .map_err(|_| "bad source port")?;
        let vip = q.get("vip").ok_or("missing vip")?.parse()?;
        let dport = match q.get("dport") {
            Some(p) => Some(p.parse().map_err(|_| "bad destination port")?),
            None => None,
        };
        Ok((src, sport, vip, dport))
    })();
    match parsed {
        Err(e) => invalid(e),
        Ok((src, sport, vip, dport)) => {
            read(move || agent.core().trace(src, sport, &vip, dport)).await
        }
    }
}

/// How long a command waits for the MACs of the backends it added (outside every lock).
const MAC_WAIT: Duration = Duration::from_millis(500);

async fn command(node: SharedNode, body: Incoming) -> Response<Full<Bytes>> {
    let start = std::time::Instant::now();
    let bytes = match Limited::new(body, MAX_COMMAND_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return invalid(format!(
                "reading the request: {e} (at most {MAX_COMMAND_BODY} bytes)"
            ));
        }
    };
    // A deny list of a million prefixes is tens of megabytes of JSON: parsed on a blocking
    // thread, so the other requests keep their workers.
    let parsed = tokio::task::spawn_blocking(move || serde_json::from_slice::<Command>(&bytes));
    let cmd: Command = match parsed.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return invalid(format!("malformed command: {e}")),
        Err(e) => return invalid(format!("reading the command: {e}")),
    };
    let (done, revision) = node.execute(cmd).await;
    let took_ns = start.elapsed().as_nanos() as u64;
    match done {
        Err(e) => error(&e),
        Ok(changed) => {
            // New backends without a MAC: give the neighbour table a moment to answer, so the
            // common case reports a serving backend; a host that does not answer stays
            // `no-mac` and blocks nothing.
            let mut no_mac = changed.no_mac;
            let deadline = tokio::time::Instant::now() + MAC_WAIT;
            while !no_mac.is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let a = node.agent().clone();
                let Ok(still) = blocking(move || a.core().no_mac()).await else {
                    break;
                };
                no_mac.retain(|a| still.contains(a));
            }
            json(
                StatusCode::OK,
                &CommandResult {
                    plan: changed.plan,
                    took_ns,
                    no_mac,
                    revision,
                },
            )
        }
    }
}

fn not_announcing() -> Error {
    Error::Invalid(
        "this agent announces no VIPs (it runs without --announce-table): there is nothing to drain or show".into(),
    )
}

/// `lb node drain|undrain`: saved (fsync) on a blocking thread, then the announcer acts.
async fn drain(node: SharedNode, body: Incoming) -> Response<Full<Bytes>> {
    let Some(a) = node.announcer().cloned() else {
        return error(&not_announcing());
    };
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return invalid(format!("reading the request: {e}")),
    };
    let req: DrainRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return invalid(format!("malformed drain request: {e}")),
    };
    let what = if req.drain {
        "node draining: announced with graceful shutdown, then withdrawn"
    } else {
        "node undrained"
    };
    let a2 = a.clone();
    match blocking(move || a2.set_drain(&req)).await.and_then(|r| r) {
        Ok(_) => {
            node.agent().record(what.to_string());
            json(StatusCode::OK, &a.view())
        }
        Err(e) => error(&e),
    }
}

async fn handle(req: Request<Incoming>, node: SharedNode) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let agent = node.agent().clone();
    match (parts.method.clone(), parts.uri.path()) {
        (Method::GET, "/v1/vips") => read(move || Ok(agent.core().list())).await,
        (Method::GET, "/v1/state") => read(move || Ok(agent.core().desired().clone())).await,
        (Method::GET, "/v1/stats") => {
            let n = node.clone();
            read(move || n.stats()).await
        }
        (Method::GET, "/v1/stats/top-sources") => read(move || agent.top_sources()).await,
        (Method::GET, "/v1/trace") => trace(agent, &parts.uri).await,
        (Method::GET, "/v1/cluster") => match node.cluster().await {
            Ok(c) => json(StatusCode::OK, &c),
            Err(e) => error(&e),
        },
        (Method::POST, "/v1/commands") => command(node, body).await,
        (Method::GET, "/v1/announce") => match node.announcer() {
            Some(a) => json(StatusCode::OK, &a.view()),
            None => error(&not_announcing()),
        },
        (Method::POST, "/v1/node/drain") => drain(node, body).await,
        _ => error(&Error::NotFound(format!(
            "no such endpoint {} {}",
            parts.method,
            parts.uri.path()
        ))),
    }
}

/// Binds the control socket, root-only from its creation (umask 077 while binding). Refuses
/// when an agent answers on it or when the path is something other than a socket; replaces a
/// stale socket.
pub async fn bind(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(Error::Conflict(format!(
                    "another agent is already serving {}: stop it first, or give this one another --socket",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(Error::io(format!(
                "removing the stale socket {}",
                path.display()
            )))?;
        }
        Ok(_) => {
            return Err(Error::Conflict(format!(
                "{} exists and is not a socket: refusing to replace it; pick another --socket",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("checking {}", path.display()))(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    // SAFETY: umask only changes this process's file-creation mask; restored right after.
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    bound.map_err(Error::io(format!("binding {}", path.display())))
}

/// The answer on the socket: a whole body, or a capture's stream.
type Answer = Response<http_body_util::Either<Full<Bytes>, capture::ChannelBody>>;

/// The capture's endpoints, then every other one ([`handle`]).
async fn route(req: Request<Incoming>, node: SharedNode) -> Answer {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/capture") => {
            let agent = node.agent().clone();
            match capture::start(agent, req.into_body()).await {
                Ok(stream) => stream.map(http_body_util::Either::Right),
                Err(e) => capture::full(error(&e)),
            }
        }
        (&Method::GET, "/v1/capture") => {
            let agent = node.agent().clone();
            capture::full(read(move || capture::status(&agent)).await)
        }
        _ => capture::full(handle(req, node).await),
    }
}

/// Serves the API until the task is dropped.
pub async fn serve(listener: UnixListener, node: SharedNode) {
    let listener = Arc::new(listener);
    listen::serve(
        move || {
            let l = listener.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        },
        Limits::API,
        "control API",
        move |req| route(req, node.clone()),
    )
    .await;
}

/// Kind of an error body, for clients that only have the status.
pub fn kind_of_status(status: u16) -> ErrorKind {
    match status {
        400 => ErrorKind::Invalid,
        403 => ErrorKind::Permission,
        404 => ErrorKind::NotFound,
        409 => ErrorKind::Conflict,
        503 => ErrorKind::Unavailable,
        507 => ErrorKind::Capacity,
        _ => ErrorKind::Kernel,
    }
}
