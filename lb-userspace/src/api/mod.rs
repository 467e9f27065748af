//! The control API: HTTP/1.1 + JSON on a root-only unix socket. `protocol` holds the types
//! both ends use; `server` answers them from the agent; `client` is the CLI's side; `listen`
//! is the accept loop shared with the metrics listener (connection limit, timeouts, backoff).
pub mod client;
pub mod listen;
pub mod protocol;
pub mod server;
pub mod status;

pub use server::SharedAgent;
