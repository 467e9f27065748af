//! `lb run`: bpffs, pinned maps and link, the agent, its API, health checks and metrics, and
//! a clean exit (or none, with `--keep-on-exit`).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Mutex;

use crate::{AttachMode, Dataplane, Error, LoadOptions, agent::Agent, api, health, metrics, model};

/// Everything `lb run` is told.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub iface: String,
    pub mode: AttachMode,
    pub load: LoadOptions,
    pub config: Option<PathBuf>,
    pub state_file: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub keep_on_exit: bool,
    pub fresh: bool,
    /// Seconds between counter lines (0: only at exit).
    pub interval: u64,
    pub duration: Option<u64>,
    pub json: bool,
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at `dir` unless one is there already.
pub fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("bad path {}", dir.display())))?;
    // SAFETY: statfs into a zeroed struct with a valid C path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let bpf = c"bpf";
    // SAFETY: valid C strings; no data argument.
    if unsafe { libc::mount(bpf.as_ptr(), c.as_ptr(), bpf.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(Error::Io {
            what: format!("mounting bpffs at {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Where this interface's pins live.
pub fn pin_dir(bpffs: &Path, iface: &str) -> PathBuf {
    bpffs.join("xdp-lb").join(iface)
}

fn remove_pins(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("link"));
    if let Ok(entries) = std::fs::read_dir(dir.join("maps")) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir.join("maps"));
    let _ = std::fs::remove_dir(dir);
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

fn print_stats(agent: &Agent, json: bool) -> Result<(), Error> {
    let stats = agent.dp.stats.global()?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&stats).map_err(|e| Error::Invalid(e.to_string()))?
        );
    } else {
        let line: Vec<String> = stats
            .0
            .iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(k, c)| format!("{k}={}", c.packets))
            .collect();
        println!(
            "counters: {}",
            if line.is_empty() {
                "(none)".into()
            } else {
                line.join(" ")
            }
        );
    }
    Ok(())
}

/// Runs the agent until Ctrl-C, SIGTERM or `duration`.
pub async fn run(opts: RunOptions) -> Result<(), Error> {
    if crate::dataplane::if_index(&opts.iface).is_none() {
        return Err(Error::NoSuchInterface(opts.iface.clone()));
    }
    let config = match &opts.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                what: format!("reading {}", path.display()),
                source,
            })?;
            Some(model::parse_config(&text).map_err(Error::Invalid)?)
        }
        None => None,
    };
    ensure_bpffs(&opts.bpffs)?;
    let pins = pin_dir(&opts.bpffs, &opts.iface);
    if opts.fresh {
        remove_pins(&pins);
    }
    let map_dir = pins.join("maps");
    std::fs::create_dir_all(&map_dir).map_err(|source| Error::Io {
        what: format!("creating {}", map_dir.display()),
        source,
    })?;
    let mut dp = Dataplane::load_with_pins(opts.load, Some(&map_dir))?;
    match dp.attach_pinned(&opts.iface, opts.mode, &pins.join("link"))? {
        Some(mode) => println!("attached to {} in {} mode", opts.iface, mode.as_str()),
        None => println!(
            "attached to {}: replaced the running program, kept its maps and flows",
            opts.iface
        ),
    }
    let listener = api::bind(&opts.socket).await?;
    let mut agent = Agent::new(dp, &opts.iface, &opts.state_file)?;
    if let Some(state) = config {
        agent.apply(state)?;
    }
    let agent = Arc::new(Mutex::new(agent));
    if let Some(addr) = opts.metrics {
        metrics::serve(addr, agent.clone()).await?;
        println!("metrics on http://{addr}/metrics");
    }
    let api_task = tokio::spawn(api::serve(listener, agent.clone()));
    let health_task = tokio::spawn(health::supervise(agent.clone()));
    println!("serving the control API on {}", opts.socket.display());

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| Error::Io {
            what: "installing the SIGTERM handler".into(),
            source,
        })?;
    let deadline = opts
        .duration
        .map(|d| Instant::now() + Duration::from_secs(d));
    let tick = Duration::from_secs(opts.interval.max(1));
    loop {
        let sleep = deadline.map_or(tick, |d| {
            tick.min(d.saturating_duration_since(Instant::now()))
        });
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = tokio::time::sleep(sleep) => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if opts.interval > 0 {
            print_stats(&*agent.lock().await, opts.json)?;
        }
    }
    api_task.abort();
    health_task.abort();
    let _ = std::fs::remove_file(&opts.socket);
    print_stats(&*agent.lock().await, opts.json)?;
    if opts.keep_on_exit {
        println!(
            "left running on {} (--keep-on-exit): maps and link stay pinned under {}",
            opts.iface,
            pins.display()
        );
    } else {
        // Removing the pins drops the last references: the program detaches, maps go.
        remove_pins(&pins);
        println!("detached from {}", opts.iface);
    }
    Ok(())
}
