//! The CLI's side of the control API.
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    Error, ErrorKind,
    api::{
        protocol::{ApiError, Command, CommandResult},
        server::kind_of_status,
    },
    capture::wire::{self, CaptureRequest},
};

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    async fn call<T: DeserializeOwned>(&self, req: Request<Full<Bytes>>) -> Result<T, Error> {
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Unavailable(format!("reading the agent's answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(remote_error(status.as_u16(), &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| Error::Unavailable(format!("unexpected answer from the agent: {e}")))
    }

    /// `lb capture`: the agent's stream of capture messages (`crate::capture::wire`).
    pub async fn capture(&self, req: &CaptureRequest) -> Result<CaptureStream, Error> {
        let body = serde_json::to_vec(req).map_err(|e| Error::Invalid(e.to_string()))?;
        let req = Request::post("/v1/capture")
            .header("host", "lb")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Unavailable(format!("reading the agent's answer: {e}")))?
                .to_bytes();
            return Err(remote_error(status.as_u16(), &body));
        }
        Ok(CaptureStream {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    /// Sends `req` on a new connection; the answer whatever its status.
    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, Error> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                let (kind, why) = match e.kind() {
                    std::io::ErrorKind::PermissionDenied => {
                        (ErrorKind::Permission, "permission denied: run it as root")
                    }
                    _ => (ErrorKind::Unavailable, "start it with `lb run --iface IF`"),
                };
                Error::Remote {
                    kind,
                    message: format!(
                        "the agent is not reachable at {} ({e}): {why}",
                        self.socket.display()
                    ),
                }
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Unavailable(format!("talking to the agent: {e}")))?;
        tokio::spawn(conn);
        sender
            .send_request(req)
            .await
            .map_err(|e| Error::Unavailable(format!("talking to the agent: {e}")))
    }

    pub async fn get<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, Error> {
        let req = Request::get(path_and_query)
            .header("host", "lb")
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        self.call(req).await
    }

    pub async fn command(&self, cmd: &Command) -> Result<CommandResult, Error> {
        self.post("/v1/commands", cmd).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, Error> {
        let body = serde_json::to_vec(body).map_err(|e| Error::Invalid(e.to_string()))?;
        let req = Request::post(path)
            .header("host", "lb")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        self.call(req).await
    }
}

/// The agent's error answer as an error.
fn remote_error(status: u16, body: &[u8]) -> Error {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => Error::Remote {
            kind: e.kind,
            message: e.error,
        },
        Err(_) => Error::Remote {
            kind: kind_of_status(status),
            message: String::from_utf8_lossy(body).into_owned(),
        },
    }
}

/// A capture's messages as they arrive.
pub struct CaptureStream {
    body: Incoming,
    buf: Vec<u8>,
}

impl CaptureStream {
    /// The next message (kind, payload); `None` when the agent closed the stream.
    pub async fn next(&mut self) -> Result<Option<(u8, Vec<u8>)>, Error> {
        loop {
            if let Some(m) = wire::next_message(&mut self.buf).map_err(Error::Unavailable)? {
                return Ok(Some(m));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(Error::Unavailable(format!("reading the capture: {e}")));
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Percent-encodes the characters of a VIP that matter in a query string.
pub fn encode_query(s: &str) -> String {
    s.replace('/', "%2F")
        .replace(':', "%3A")
        .replace('[', "%5B")
        .replace(']', "%5D")
}
