//! The control API: HTTP/1.1 + JSON with hyper on a unix socket only root can open (0600).
//! Reads are GETs; every change is one `POST /v1/commands` carrying a [`Command`].
use std::{convert::Infallible, net::IpAddr, path::Path, sync::Arc};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use lb_common::Counter;
use serde::{Deserialize, Serialize};
use tokio::{net::UnixListener, sync::Mutex};

use crate::{
    Error,
    agent::Agent,
    model::{BackendSpec, DesiredState, HealthCheck, Mac, VipAddr},
    plan::VipPlan,
    stats::GlobalStats,
};

pub type SharedAgent = Arc<Mutex<Agent>>;

/// A change, as sent by the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    AddVip {
        vip: VipAddr,
        source_hash: bool,
        health: Option<HealthCheck>,
    },
    RemoveVip {
        vip: VipAddr,
    },
    AddBackend {
        vip: VipAddr,
        address: IpAddr,
        weight: u32,
        mac: Option<Mac>,
    },
    RemoveBackend {
        vip: VipAddr,
        address: IpAddr,
    },
    SetWeight {
        vip: VipAddr,
        address: IpAddr,
        weight: u32,
    },
    Drain {
        vip: VipAddr,
        address: IpAddr,
        drained: bool,
    },
    Apply {
        state: DesiredState,
        dry_run: bool,
    },
}

/// Answer to a command.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CommandResult {
    /// For `Apply`: what changes.
    #[serde(default)]
    pub plan: Vec<VipPlan>,
    /// Nanoseconds from receiving the command to the kernel maps being updated.
    pub took_ns: u64,
}

/// Counters of one backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStats {
    pub address: IpAddr,
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of one VIP.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStats {
    pub vip: VipAddr,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsView {
    pub global: std::collections::BTreeMap<String, Counter>,
    pub vips: Vec<VipStats>,
}

/// Error body.
#[derive(Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body =
        serde_json::to_vec(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn bad(msg: impl Into<String>) -> Response<Full<Bytes>> {
    json(StatusCode::BAD_REQUEST, &ApiError { error: msg.into() })
}

/// Stats of every VIP and backend, read from the per-CPU maps.
pub fn stats(agent: &Agent) -> Result<StatsView, Error> {
    let global: GlobalStats = agent.dp.stats.global()?;
    let mut vips = Vec::new();
    for v in agent.list() {
        let c = agent.dp.stats.vip(v.id)?;
        let mut backends = Vec::new();
        for b in &v.backends {
            let bc = agent.dp.stats.backend(b.id)?;
            backends.push(BackendStats {
                address: b.address,
                packets: bc.packets,
                bytes: bc.bytes,
            });
        }
        vips.push(VipStats {
            vip: v.vip,
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            backends,
        });
    }
    Ok(StatsView {
        global: global
            .0
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        vips,
    })
}

fn execute(agent: &mut Agent, cmd: Command) -> Result<CommandResult, Error> {
    let start = std::time::Instant::now();
    let mut plan = Vec::new();
    match cmd {
        Command::AddVip {
            vip,
            source_hash,
            health,
        } => {
            if let Some(h) = &health {
                h.validate(&vip).map_err(Error::Invalid)?;
            }
            agent.add_vip(vip, source_hash, health)?
        }
        Command::RemoveVip { vip } => agent.remove_vip(&vip)?,
        Command::AddBackend {
            vip,
            address,
            weight,
            mac,
        } => agent.add_backend(
            &vip,
            address,
            BackendSpec {
                weight,
                mac,
                drained: false,
            },
        )?,
        Command::RemoveBackend { vip, address } => agent.remove_backend(&vip, address)?,
        Command::SetWeight {
            vip,
            address,
            weight,
        } => agent.set_weight(&vip, address, weight)?,
        Command::Drain {
            vip,
            address,
            drained,
        } => agent.set_drained(&vip, address, drained)?,
        Command::Apply { state, dry_run } => {
            state.validate().map_err(Error::Invalid)?;
            plan = if dry_run {
                crate::plan::plan(agent.desired(), &state, agent.dp.opts.ring_size)
            } else {
                agent.apply(state)?
            };
        }
    }
    Ok(CommandResult {
        plan,
        took_ns: start.elapsed().as_nanos() as u64,
    })
}

fn query(uri: &hyper::Uri) -> std::collections::HashMap<String, String> {
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

async fn handle(
    req: Request<hyper::body::Incoming>,
    agent: SharedAgent,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let resp = match (parts.method.clone(), parts.uri.path()) {
        (Method::GET, "/v1/vips") => json(StatusCode::OK, &agent.lock().await.list()),
        (Method::GET, "/v1/state") => json(StatusCode::OK, agent.lock().await.desired()),
        (Method::GET, "/v1/stats") => match stats(&*agent.lock().await) {
            Ok(s) => json(StatusCode::OK, &s),
            Err(e) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &ApiError {
                    error: e.to_string(),
                },
            ),
        },
        (Method::GET, "/v1/trace") => {
            let q = query(&parts.uri);
            let parsed = (|| -> Result<(IpAddr, u16, VipAddr), String> {
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
                Ok((src, sport, vip))
            })();
            match parsed {
                Err(e) => bad(e),
                Ok((src, sport, vip)) => match agent.lock().await.trace(src, sport, &vip) {
                    Ok(t) => json(StatusCode::OK, &t),
                    Err(e) => bad(e.to_string()),
                },
            }
        }
        (Method::POST, "/v1/commands") => match body.collect().await {
            Err(e) => bad(format!("reading the request: {e}")),
            Ok(b) => match serde_json::from_slice::<Command>(&b.to_bytes()) {
                Err(e) => bad(format!("malformed command: {e}")),
                Ok(cmd) => match execute(&mut *agent.lock().await, cmd) {
                    Ok(r) => json(StatusCode::OK, &r),
                    Err(e) => bad(e.to_string()),
                },
            },
        },
        _ => json(
            StatusCode::NOT_FOUND,
            &ApiError {
                error: format!("no such endpoint {} {}", parts.method, parts.uri.path()),
            },
        ),
    };
    Ok(resp)
}

/// Binds the control socket: refuses when another agent answers on it, replaces a stale
/// one, and makes it root-only.
pub async fn bind(path: &Path) -> Result<UnixListener, Error> {
    let io = |what: String| move |source| Error::Io { what, source };
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(Error::Invalid(format!(
            "another agent is already serving {}: stop it first, or use --socket",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let listener = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("restricting {}", path.display())))?;
    Ok(listener)
}

/// Serves the API until the task is dropped.
pub async fn serve(listener: UnixListener, agent: SharedAgent) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, agent.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
