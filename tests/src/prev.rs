//! The previous release's `lb`: the last commit of the previous map ABI, taken from git
//! (`git archive`, so no worktree is registered) and built once with its own target
//! directory under `target/prev-abiN/`, never touching `target/release`. The upgrade test
//! starts it on a network, then this build on its pins. A clone with full history has the
//! commit; the build takes minutes the first time and nothing after (the binary is cached
//! with the commit it was built from).
use std::{
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The last commit of map ABI [`lb_common::previous::VERSION`]: move it with every ABI bump
/// (DEVELOPING.md, "Adding a migration").
pub const PREV_COMMIT: &str = "630985819032e1d3d16f31eab329d38be4f2633a";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(30).collect();
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// The previous release's `lb`, built if not cached. Test processes running side by side
/// take turns on a lock file, so it is built once.
pub fn prev_lb() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let base = root
        .join("target")
        .join(format!("prev-abi{}", lb_common::previous::VERSION));
    let (bin, stamp) = (base.join("lb"), base.join("commit"));
    let cached =
        || bin.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(PREV_COMMIT);
    if cached() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let lock = std::fs::File::create(base.join("lock")).context("the build lock")?;
    // SAFETY: flock on a file we own; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking {}", base.display());
    }
    if cached() {
        return Ok(bin);
    }
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    run(
        Command::new("sh").arg("-c").arg(format!(
            "git -C '{}' archive {PREV_COMMIT} | tar -x -C '{}'",
            root.display(),
            src.display()
        )),
        "git archive of the previous release (a clone with full history has it)",
    )?;
    let target = base.join("target");
    let deps = root.join("target").join("release");
    if !target.exists() && deps.join("deps").is_dir() {
        // The same dependency versions are built already: start from them (times kept, so
        // cargo sees them fresh); only the workspace's crates build again.
        std::fs::create_dir_all(target.join("release"))?;
        for d in ["deps", "build", ".fingerprint"] {
            let _ = Command::new("cp")
                .args(["-a"])
                .arg(deps.join(d))
                .arg(target.join("release"))
                .status();
        }
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(
        Command::new(cargo)
            .args(["build", "--release", "-p", "lb-userspace", "--bin", "lb"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", &target)
            // Not this checkout's commit in its `--version`: outside git it says `unknown`.
            .env("GIT_DIR", base.join("no-git")),
        "building the previous release",
    )?;
    let tmp = base.join("lb.tmp");
    std::fs::copy(target.join("release").join("lb"), &tmp)?;
    std::fs::rename(&tmp, &bin)?;
    std::fs::write(&stamp, PREV_COMMIT)?;
    Ok(bin)
}
