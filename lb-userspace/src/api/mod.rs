//! The control API: HTTP/1.1 + JSON on a root-only unix socket. The types both ends use are
//! [`crate::protocol`]'s; `server` answers from the node (its agent and fleet); `client` is
//! the CLI's side; `listen` is the accept loop shared with the metrics listener (connection
//! limit, timeouts, backoff); `status` is the status page's data; `snapshot` the one read of
//! the agent that `/metrics` and the status page share.
pub mod capture;
pub mod client;
pub mod listen;
pub mod server;
pub mod snapshot;
pub mod status;

/// The wire types live below the agent (it answers with them); named here for the API's users.
pub use crate::protocol;
pub use server::SharedNode;
