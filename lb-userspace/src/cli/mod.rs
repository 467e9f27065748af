//! The `lb` command line: `args` defines and validates it, `commands` runs it against the
//! agent's API (or runs the agent, `run`), `output` prints; a subcommand with more than a few
//! lines of its own has its module (`state` for `lb vip`/`lb backend`, `stats`, `guard`, ...).
pub mod args;
pub mod capture;
pub mod cluster;
pub mod commands;
pub mod decap;
pub mod guard;
pub mod node;
pub mod output;
pub mod run;
pub mod state;
pub mod stats;
pub mod upgrade;

pub use args::{Cli, Top};
pub use commands::execute;
