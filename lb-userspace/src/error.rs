//! Errors as types. Each variant has a [`ErrorKind`] that the API carries over the wire (as an
//! HTTP status and a `kind` field) and the CLI turns into its exit code, so a script can tell
//! "no such backend" from "the kernel refused" without parsing text.
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What kind of failure: decides the HTTP status and the CLI's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong (bad address, out-of-range value, malformed JSON).
    Invalid,
    /// It names something that does not exist.
    NotFound,
    /// It clashes with what exists (already there, another agent, incompatible pins).
    Conflict,
    /// A table is full.
    Capacity,
    /// The agent cannot be reached, or is not running.
    Unavailable,
    /// The kernel refused (BPF syscalls, attach, load).
    Kernel,
    /// Files: the state file, sockets, bpffs.
    Io,
    /// Not privileged enough.
    Permission,
}

impl ErrorKind {
    /// HTTP status the API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::Invalid => 400,
            ErrorKind::Permission => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Capacity => 507,
            ErrorKind::Unavailable => 503,
            ErrorKind::Kernel | ErrorKind::Io => 500,
        }
    }

    /// Exit code of the `lb` CLI (documented in the README). 2 matches clap's usage errors.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Invalid => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::Conflict => 4,
            ErrorKind::Capacity => 5,
            ErrorKind::Unavailable => 6,
            ErrorKind::Kernel => 7,
            ErrorKind::Io => 8,
            ErrorKind::Permission => 9,
        }
    }
}

#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "this needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (missing: {0}): run it as root, or with those capabilities (see the README's \"Install as a service\")"
    )]
    NotPrivileged(String),
    #[error("interface `{0}` does not exist: check the name with `ip link`")]
    NoSuchInterface(String),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error(
        "program `{name}` is missing from the eBPF object (rebuild with `cargo build --release`)"
    )]
    MissingProgram { name: &'static str },
    #[error("map `{name}` is missing from the eBPF object (rebuild with `cargo build --release`)")]
    MissingMap { name: &'static str },
    #[error("the kernel rejected program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching to `{iface}` in {mode} mode failed: {source}{hint}")]
    Attach {
        iface: String,
        mode: &'static str,
        /// What to try instead, if anything (empty or starting with "; ").
        hint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Capacity(String),
    #[error("{0}")]
    Unavailable(String),
    /// A kernel write other than a map update failed (pins, links).
    #[error("{0}")]
    Kernel(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// The change is saved and in memory, but the kernel could not be brought in line yet;
    /// the agent keeps retrying.
    #[error("saved, but the data plane is not updated yet ({0}); the agent retries every second")]
    NotConverged(String),
    /// etcd refused or failed a request (fleet mode), with its cause.
    #[error(transparent)]
    Store(#[from] crate::fleet::access::StoreError),
    /// An error reported by the agent over the API.
    #[error("{message}")]
    Remote { kind: ErrorKind, message: String },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotPrivileged(_) => ErrorKind::Permission,
            Error::NoSuchInterface(_) | Error::NotFound(_) => ErrorKind::NotFound,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::Conflict(_) => ErrorKind::Conflict,
            Error::Capacity(_) => ErrorKind::Capacity,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Io { .. } => ErrorKind::Io,
            Error::Load(_)
            | Error::MissingProgram { .. }
            | Error::MissingMap { .. }
            | Error::Program { .. }
            | Error::Attach { .. }
            | Error::Kernel(_)
            | Error::Map { .. }
            | Error::NotConverged(_) => ErrorKind::Kernel,
            Error::Store(e) => e.cause.kind(),
            Error::Remote { kind, .. } => *kind,
        }
    }

    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
