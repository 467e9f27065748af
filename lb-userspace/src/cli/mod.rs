//! The `lb` command line: `args` defines and validates it, `commands` runs it against the
//! agent's API (or runs the agent), `output` prints.
pub mod args;
pub mod capture;
pub mod cluster;
pub mod commands;
pub mod decap;
pub mod guard;
pub mod node;
pub mod output;
pub mod upgrade;

pub use args::{Cli, Top};
pub use commands::execute;
