//! Builds the eBPF objects with aya-build (nightly, bpfel target, bpf-linker) so that
//! `cargo build --release` yields one self-contained `lb` binary: `lb-ebpf` (the load
//! balancer) and `lb-decap` (the backends' decap program). With this crate's `bench` feature
//! it first builds them with `lb-ebpf`'s `bench` feature (the benchmark harness programs) as
//! `lb-ebpf-bench` and `lb-decap-bench`; the product objects are built without it.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .join("lb-ebpf");
    let root = root.to_str().context("non-UTF-8 workspace path")?;
    git_revision();
    if linting() {
        return placeholders();
    }
    let build = |features: &[&str]| {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "lb-ebpf",
                root_dir: root,
                features,
                ..Default::default()
            }],
            aya_build::Toolchain::default(),
        )
    };
    if std::env::var_os("CARGO_FEATURE_BENCH").is_some() {
        // aya-build names each object after its binary: build the benchmark ones first and
        // rename them, so the product build below writes the plain names last.
        build(&["bench"])?;
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        for bin in ["lb-ebpf", "lb-decap"] {
            std::fs::rename(out.join(bin), out.join(format!("{bin}-bench")))
                .with_context(|| format!("naming the benchmark object {bin}-bench"))?;
        }
    }
    build(&[])
}

/// `LB_GIT_REV` for `lb --version`: the commit built, `-dirty` with local changes, `unknown`
/// outside a git checkout (e.g. a container build that copies only the sources).
/// Whether this is clippy's check build (its driver wraps rustc for the workspace): it needs
/// the objects to exist for `include_bytes!`, never their contents, and its build-script run
/// is its own (not shared with `cargo build`'s), so building the eBPF programs for it only
/// costs time. `lb-ebpf` is linted by its own clippy run for the bpf target.
fn linting() -> bool {
    println!("cargo:rerun-if-env-changed=RUSTC_WORKSPACE_WRAPPER");
    std::env::var_os("RUSTC_WORKSPACE_WRAPPER").is_some_and(|w| {
        std::path::Path::new(&w)
            .file_stem()
            .is_some_and(|n| n.to_string_lossy().starts_with("clippy-driver"))
    })
}

/// Empty objects where the eBPF programs go, for a lint run only (see [`linting`]).
fn placeholders() -> anyhow::Result<()> {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    for name in ["lb-ebpf", "lb-decap", "lb-ebpf-bench", "lb-decap-bench"] {
        std::fs::write(out.join(name), b"")
            .with_context(|| format!("writing the lint placeholder {name}"))?;
    }
    Ok(())
}

fn git_revision() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(rev)
            if git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()) =>
        {
            format!("{rev}-dirty")
        }
        Some(rev) => rev,
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=LB_GIT_REV={rev}");
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/index"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
