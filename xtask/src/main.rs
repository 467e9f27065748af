//! Drivers for the README's commands: `setup`, `demo`, `test`, `bench`, `man`.
//!
//! xtask builds nothing itself beyond calling cargo: the eBPF object is built by
//! `lb-userspace/build.rs`. `setup` makes a fresh Debian machine able to do that build and run
//! the privileged tests; every step checks first, so a second run takes seconds.
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks: setup, demo, test, bench")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent).
    Setup {
        /// Only what building `lb` needs (the container image's build stage).
        #[arg(long)]
        build_only: bool,
    },
    /// Build everything and run the demo on a throw-away veth network.
    Demo {
        /// Keep the network up until Ctrl-C and print commands to explore it.
        #[arg(long)]
        keep: bool,
        /// `l2` (default): one segment, direct server return. `ipip` or `gue`: the routed
        /// scene, backends behind a router running `lb decap`.
        #[arg(long, default_value = "l2")]
        mode: String,
        /// The fleet: three load balancer nodes behind ECMP following one etcd.
        #[arg(long)]
        fleet: bool,
        /// The seed's scene: its nginx `upstream` (ports 8000 and 8001 behind :80) imported
        /// with `lb import nginx`, served through NAT.
        #[arg(long)]
        seed: bool,
    },
    /// Build everything and run every test, privileged ones included.
    Test,
    /// Build everything and print the benchmark tables.
    Bench,
    /// Build `lb` and write its man pages (lb.1, lb-run.1, ...) to target/man.
    Man,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup { build_only } => setup::run(build_only),
        Task::Demo {
            keep,
            mode,
            fleet,
            seed,
        } => setup::run(false).and_then(|()| demo(keep, &mode, fleet, seed)),
        Task::Test => setup::run(false).and_then(|()| test()),
        Task::Bench => setup::run(false).and_then(|()| bench()),
        Task::Man => man(),
    };
    if let Err(err) = result {
        eprintln!("xtask: {err:#}");
        std::process::exit(1);
    }
}

/// Runs `cmd`, failing with its description when it exits non-zero.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("PATH", setup::path_with_cargo_bin());
    cmd
}

fn build_release() -> anyhow::Result<()> {
    run_cmd(cargo().args(["build", "--release", "--all-targets"]))
}

fn man() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    run_cmd(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "lb"]))?;
    run_cmd(
        Command::new(root.join("target/release/lb"))
            .arg("man")
            .arg("--out")
            .arg(root.join("target/man")),
    )
}

fn test() -> anyhow::Result<()> {
    lint()?;
    build_release()?;
    // One release build serves the binary, the unit tests and the privileged tests.
    run_cmd(cargo().args(["test", "--release", "--no-fail-fast"]))
}

/// Formatting and clippy are part of the test command so CI enforces them. The eBPF crate is
/// linted for its own target (it does not build for the host): its library and both program
/// objects, once as the product builds them and once with the benchmark harnesses (`bench`).
fn lint() -> anyhow::Result<()> {
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run_cmd(cargo().args([
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    for features in [&[][..], &["--features", "bench"]] {
        run_cmd(
            Command::new("cargo")
                .env("PATH", setup::path_with_cargo_bin())
                .current_dir(workspace_root().join("lb-ebpf"))
                .args([
                    "+nightly",
                    "clippy",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                ])
                .args(["-Z", "build-std=core", "--lib", "--bins"])
                .args(features)
                .args(["--", "-D", "warnings"]),
        )?;
    }
    Ok(())
}

/// Runs one of the `lb-tests` binaries (release) with `args`.
fn run_tests_bin(bin: &str, args: &[&str]) -> anyhow::Result<()> {
    build_release()?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "-q",
        "-p",
        "lb-tests",
        "--bin",
        bin,
        "--",
    ])
    .args(args);
    run_cmd(&mut cmd)
}

fn demo(keep: bool, mode: &str, fleet: bool, seed: bool) -> anyhow::Result<()> {
    let mut args = vec!["--mode", mode];
    if keep {
        args.push("--keep");
    }
    if fleet {
        args.push("--fleet");
    }
    if seed {
        args.push("--seed");
    }
    run_tests_bin("lb-demo", &args)
}

fn bench() -> anyhow::Result<()> {
    run_tests_bin("lb-bench", &[])
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
