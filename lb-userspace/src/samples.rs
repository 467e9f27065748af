//! Sample backends: N hyper HTTP servers (the seed's "Hello, Tornado!" apps), each answering
//! `hello from backend i` with the client's address, plus `/health`, and a UDP echo on the
//! same port that answers the same line.
use std::{convert::Infallible, net::SocketAddr};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;

use crate::Error;

/// Size of the `/big` download.
pub const BIG: usize = 1 << 20;

/// The line backend `index` answers a client at `peer` with.
pub fn greeting(index: usize, local: SocketAddr, peer: SocketAddr) -> String {
    format!("hello from backend {index} ({local}); you are {peer}\n")
}

async fn http_server(index: usize, addr: SocketAddr) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            what: format!("binding {addr}"),
            source,
        })?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let local = stream.local_addr().unwrap_or(addr);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    let resp = match req.uri().path() {
                        "/health" => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
                        "/" => Response::new(Full::new(Bytes::from(greeting(index, local, peer)))),
                        // A large download and an upload: path-MTU tests send these.
                        "/big" => Response::new(Full::new(Bytes::from(vec![b'x'; BIG]))),
                        "/upload" => {
                            let n = match req.into_body().collect().await {
                                Ok(b) => b.to_bytes().len(),
                                Err(_) => 0,
                            };
                            Response::new(Full::new(Bytes::from(format!(
                                "backend {index} received {n} bytes\n"
                            ))))
                        }
                        _ => {
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(b"not found\n")));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        }
                    };
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

async fn udp_server(index: usize, addr: SocketAddr) -> Result<(), Error> {
    let sock = tokio::net::UdpSocket::bind(addr)
        .await
        .map_err(|source| Error::Io {
            what: format!("binding UDP {addr}"),
            source,
        })?;
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((_, peer)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let local = sock.local_addr().unwrap_or(addr);
            let _ = sock
                .send_to(greeting(index, local, peer).as_bytes(), peer)
                .await;
        }
    });
    Ok(())
}

/// Starts `count` backends on `bind:base_port + i` (TCP and UDP); they run until the runtime
/// stops.
pub async fn start(
    count: usize,
    base_port: u16,
    bind: std::net::IpAddr,
    first_index: usize,
) -> Result<Vec<SocketAddr>, Error> {
    let mut addrs = Vec::new();
    for i in 0..count {
        let port = base_port.checked_add(i as u16).ok_or_else(|| {
            Error::Invalid(format!(
                "ports {base_port}+{count} run past 65535: lower --base-port"
            ))
        })?;
        let addr = SocketAddr::new(bind, port);
        http_server(first_index + i, addr).await?;
        udp_server(first_index + i, addr).await?;
        addrs.push(addr);
    }
    Ok(addrs)
}
