//! Health checks: one task per (VIP, backend) probing with TCP connect or HTTP GET at the
//! configured interval; results go to the agent, which applies rise/fall and republishes.
//! Results are recorded on a blocking thread: a flip rewrites slot tables.
use std::{collections::HashMap, net::IpAddr, net::SocketAddr, time::Duration};

use http_body_util::Empty;
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinHandle, time::timeout};

use crate::{
    api::SharedAgent,
    model::{HealthCheck, HealthKind, VipAddr},
};

/// Longest health-check path sent (longer ones are refused by validation).
pub const MAX_PATH: usize = 1024;

/// One probe: `(passed, what happened)`.
pub async fn probe(addr: IpAddr, check: &HealthCheck, vip_port: u16) -> (bool, String) {
    let port = check.port.unwrap_or(vip_port);
    let target = SocketAddr::new(addr, port);
    let limit = Duration::from_millis(check.timeout_ms);
    let result = timeout(limit, async {
        let stream = TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect {target}: {e}"))?;
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
            format!("no answer from {target} within {} ms", check.timeout_ms),
        ),
    }
}

async fn probe_loop(agent: SharedAgent, vip: VipAddr, addr: IpAddr, check: HealthCheck) {
    let mut tick = tokio::time::interval(Duration::from_millis(check.interval_ms));
    loop {
        tick.tick().await;
        let (ok, detail) = probe(addr, &check, vip.port).await;
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
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => log::warn!("health of {addr} in {vip}: {e}"),
            Err(e) => log::warn!("health of {addr} in {vip}: {e}"),
        }
    }
}

/// Backends that need probing: (VIP, address, check).
fn health_targets(core: &crate::agent::Core) -> Vec<(VipAddr, IpAddr, HealthCheck)> {
    let mut out = Vec::new();
    for (vip, spec) in &core.desired().vips {
        if let Some(h) = &spec.health {
            for addr in spec.backends.keys() {
                out.push((*vip, *addr, h.clone()));
            }
        }
    }
    out
}

/// Keeps one probe task per configured target, following configuration changes.
pub async fn supervise(agent: SharedAgent) {
    let mut running: HashMap<(VipAddr, IpAddr), (HealthCheck, JoinHandle<()>)> = HashMap::new();
    loop {
        let targets = health_targets(&agent.core());
        let wanted: HashMap<(VipAddr, IpAddr), HealthCheck> =
            targets.into_iter().map(|(v, a, c)| ((v, a), c)).collect();
        running.retain(|k, (check, task)| {
            let keep = wanted.get(k) == Some(check);
            if !keep {
                task.abort();
            }
            keep
        });
        for (k, check) in wanted {
            running.entry(k).or_insert_with(|| {
                let task = tokio::spawn(probe_loop(agent.clone(), k.0, k.1, check.clone()));
                (check, task)
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
