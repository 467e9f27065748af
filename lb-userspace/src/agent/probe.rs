//! Health checks: one task per (VIP, backend) probing with TCP connect or HTTP GET at the
//! configured interval; results go to the agent, which applies rise/fall and republishes.
//! Results are recorded on a blocking thread: a flip rewrites slot tables.
use std::{collections::HashMap, net::IpAddr, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Empty;
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use std::os::fd::AsRawFd as _;

use lb_common::HC_MARK_BASE;
use tokio::{
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
    time::timeout,
};

use crate::{
    agent::Agent,
    model::{BackendAddr, HealthCheck, HealthKind, VipAddr},
};

/// Told of every health flip after the agent has applied it (in a fleet the node publishes
/// its verdict at once).
pub type OnFlip = Arc<dyn Fn() + Send + Sync>;

/// Longest health-check path sent: the model's validation refuses longer ones.
pub use crate::model::MAX_PATH;

/// Where a probe goes: the backend itself (L2 forwarding), or the VIP through the tunnel to
/// one backend (encapsulating VIPs: the socket's mark tells the tc program which).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    pub addr: IpAddr,
    /// `HC_MARK_BASE | backend id` for probes through the tunnel.
    pub mark: Option<u32>,
}

async fn connect(target: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(target).await;
    };
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let value: libc::c_int = mark as libc::c_int;
    // SAFETY: setsockopt on a socket we own with a correctly sized int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    sock.connect(target).await
}

/// One probe: `(passed, what happened)`.
pub async fn probe(to: ProbeTarget, check: &HealthCheck, vip_port: u16) -> (bool, String) {
    let port = check.port.unwrap_or(vip_port);
    let target = SocketAddr::new(to.addr, port);
    let via = if to.mark.is_some() {
        " through the tunnel"
    } else {
        ""
    };
    let limit = Duration::from_millis(check.timeout_ms);
    let result = timeout(limit, async {
        let stream = connect(target, to.mark)
            .await
            .map_err(|e| format!("connect {target}{via}: {e}"))?;
        if check.kind == HealthKind::Tcp {
            return Ok("ok".to_string());
        }
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| format!("http {target}: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(check.path.as_str())
            .header("host", target.to_string())
            .header("user-agent", "xdp-lb-health")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {}: {e}", check.path))?;
        if resp.status().as_u16() == check.expect_status {
            Ok("ok".to_string())
        } else {
            Err(format!(
                "GET {} answered {}, expected {}",
                check.path,
                resp.status().as_u16(),
                check.expect_status
            ))
        }
    })
    .await;
    match result {
        Ok(Ok(s)) => (true, s),
        Ok(Err(e)) => (false, e),
        Err(_) => (
            false,
            format!(
                "no answer from {target}{via} within {} ms",
                check.timeout_ms
            ),
        ),
    }
}

async fn probe_loop(
    agent: Arc<Agent>,
    on_flip: OnFlip,
    vip: VipAddr,
    addr: BackendAddr,
    to: ProbeTarget,
    check: HealthCheck,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(check.interval_ms));
    loop {
        tick.tick().await;
        let (ok, detail) = probe(to, &check, addr.port_for(vip.port)).await;
        let a = agent.clone();
        let recorded =
            tokio::task::spawn_blocking(move || a.core().observe_health(&vip, addr, ok, detail))
                .await;
        match recorded {
            Ok(Ok(true)) => {
                let what = format!(
                    "backend {addr} of {vip} is now {}",
                    if ok { "up" } else { "down" }
                );
                log::info!("{what}");
                agent.record(what);
                on_flip();
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => log::warn!("health of {addr} in {vip}: {e}"),
            Err(e) => log::warn!("health of {addr} in {vip}: {e}"),
        }
    }
}

/// Backends that need probing: (VIP, address, where the probe goes, check).
fn health_targets(
    core: &crate::agent::Core,
) -> Vec<(VipAddr, BackendAddr, ProbeTarget, HealthCheck)> {
    let mut out = Vec::new();
    for (vip, spec) in &core.desired().vips {
        if let Some(h) = &spec.health {
            for addr in spec.backends.keys() {
                let to = if spec.forward.encapsulates() {
                    // No id yet (not committed): probed once it has one.
                    let Some(id) = core.ids().backend(vip, addr) else {
                        continue;
                    };
                    ProbeTarget {
                        addr: vip.ip,
                        mark: Some(HC_MARK_BASE | id),
                    }
                } else {
                    ProbeTarget {
                        addr: addr.ip,
                        mark: None,
                    }
                };
                out.push((*vip, *addr, to, h.clone()));
            }
        }
    }
    out
}

/// Keeps one probe task per configured target, following configuration changes.
pub async fn supervise(agent: Arc<Agent>, on_flip: OnFlip) {
    type Running = HashMap<(VipAddr, BackendAddr), ((ProbeTarget, HealthCheck), JoinHandle<()>)>;
    let mut running: Running = HashMap::new();
    loop {
        let targets = match agent.with_core(health_targets).await {
            Ok(t) => t,
            Err(e) => {
                log::warn!("{e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let wanted: HashMap<(VipAddr, BackendAddr), (ProbeTarget, HealthCheck)> = targets
            .into_iter()
            .map(|(v, a, t, c)| ((v, a), (t, c)))
            .collect();
        running.retain(|k, (how, task)| {
            let keep = wanted.get(k) == Some(how);
            if !keep {
                task.abort();
            }
            keep
        });
        for (k, how) in wanted {
            running.entry(k).or_insert_with(|| {
                let (to, check) = how.clone();
                let task = tokio::spawn(probe_loop(
                    agent.clone(),
                    on_flip.clone(),
                    k.0,
                    k.1,
                    to,
                    check,
                ));
                (how, task)
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
