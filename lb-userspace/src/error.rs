//! Errors with enough context for a one-line message that says what to do.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("this needs root (CAP_BPF and CAP_NET_ADMIN): run it with sudo or as root")]
    NotRoot,
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
    #[error("attaching to `{iface}` in {mode} mode failed: {source}; try `--mode generic`")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{0}")]
    Invalid(String),
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
}
