//! `lb run`: the lock, the control socket, bpffs, pinned maps and link, the agent, its API,
//! health checks, neighbours and metrics, and a clean exit (or none, with `--keep-on-exit`).
//!
//! Order matters for "a refused start changes nothing": the interface and config are checked,
//! the per-interface lock is taken, the socket is bound and the pinned maps are checked for
//! compatibility, all before any pin is removed (`--fresh`), loaded or attached.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    AttachMode, Dataplane, Error, LoadOptions,
    agent::{Agent, neigh::NetlinkNeighbours, probe, state::FileStore},
    api::{self, SharedAgent},
    dataplane::{
        egress::TxPorts,
        kernel::{EncapSources, MapsKernel},
        pins::{self, AgentLock, Pins},
    },
    metrics, model,
};

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
    /// Outer source addresses given with `--encap-source` (at most one per family).
    pub encap_sources: Vec<std::net::IpAddr>,
    /// Fleet mode: the desired state comes from this store.
    pub store: Option<crate::fleet::FleetConfig>,
}

/// The outer source per family: given, or the interface's first global address.
fn encap_sources(opts: &RunOptions) -> Result<EncapSources, Error> {
    let mut out = EncapSources::default();
    for a in &opts.encap_sources {
        let dup = match a {
            std::net::IpAddr::V4(v4) => out.v4.replace(*v4).is_some(),
            std::net::IpAddr::V6(v6) => out.v6.replace(*v6).is_some(),
        };
        if dup || a.is_unspecified() || a.is_multicast() {
            return Err(Error::Invalid(format!(
                "--encap-source {a}: give at most one unicast address per family"
            )));
        }
    }
    for a in crate::net::interface_addrs(&opts.iface) {
        match a {
            std::net::IpAddr::V4(v4) if out.v4.is_none() => out.v4 = Some(v4),
            std::net::IpAddr::V6(v6) if out.v6.is_none() => out.v6 = Some(v6),
            _ => {}
        }
    }
    Ok(out)
}

/// The sysctls encapsulation needs on `iface` that are not set: forwarding for both families
/// (the FIB lookup refuses otherwise) and IPv4 `accept_local` (the no-neighbour hand-off gives
/// the stack a packet whose source is our own address).
fn encap_sysctls_missing(iface: &str) -> Vec<String> {
    [
        ("ipv4", "forwarding"),
        ("ipv6", "forwarding"),
        ("ipv4", "accept_local"),
    ]
    .iter()
    .map(|(f, k)| format!("/proc/sys/net/{f}/conf/{iface}/{k}"))
    .filter(|p| std::fs::read_to_string(p).is_ok_and(|v| v.trim() == "0"))
    .map(|p| p.trim_start_matches("/proc/sys/").replace('/', "."))
    .collect()
}

/// Every few seconds: the egress device map follows the host's interfaces, and the next hops
/// of encapsulated backends are kept resolved (one datagram to each backend's discard port
/// makes the kernel resolve the route's next hop, so the program's FIB lookup finds a MAC).
async fn egress_upkeep(agent: SharedAgent, mut ports: TxPorts, iface: String) {
    let mut warned = false;
    let mut known = std::collections::BTreeSet::new();
    let mut tick: u64 = 0;
    loop {
        tick += 1;
        // New backends are resolved within a second; all of them every five.
        let routed = agent.core().routed_backends();
        for addr in routed
            .iter()
            .filter(|a| tick.is_multiple_of(5) || !known.contains(*a))
        {
            crate::agent::neigh::solicit(*addr).await;
        }
        known = routed;
        // The device map and the sysctl check: at once, then every five seconds.
        if tick % 5 == 1 {
            let name = iface.clone();
            let synced = tokio::task::spawn_blocking(move || {
                ports.sync();
                (ports, encap_sysctls_missing(&name))
            })
            .await;
            let off = match synced {
                Ok((p, off)) => {
                    ports = p;
                    off
                }
                Err(e) => {
                    log::warn!("egress device map upkeep stopped: {e}");
                    return;
                }
            };
            if !known.is_empty() && !warned && !off.is_empty() {
                let what = format!(
                    "encapsulating VIPs need on {iface}: {} = 1 (without forwarding packets are dropped as dropped_forwarding_disabled; without accept_local, IPv4 packets handed to the stack for a missing neighbour are dropped)",
                    off.join(" and ")
                );
                log::warn!("{what}");
                agent.record(what);
                warned = true;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at `dir` unless one is there already.
pub fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
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
        return Err(Error::io(format!("mounting bpffs at {}", dir.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn print_stats(agent: &Agent, json: bool) -> Result<(), Error> {
    let stats = api::server::stats(agent)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&stats.global).map_err(|e| Error::Invalid(e.to_string()))?
        );
    } else {
        let line: Vec<String> = stats
            .global
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

fn read_config(path: &Option<PathBuf>) -> Result<Option<model::DesiredState>, Error> {
    let Some(path) = path else { return Ok(None) };
    let text =
        std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))?;
    model::parse_config(&text).map(Some).map_err(Error::Invalid)
}

/// Loads, checks and attaches the data plane; returns it with the attach message.
fn attach(opts: &RunOptions, pins_dir: &Path) -> Result<(Dataplane, String), Error> {
    let map_dir = pins_dir.join("maps");
    if opts.fresh {
        pins::remove_pins(pins_dir);
    }
    let found = pins::check(&map_dir, &opts.load)?;
    let loaded = load_and_attach(opts, pins_dir, found);
    if loaded.is_err() && found == Pins::Fresh {
        // Nothing was pinned before this start: leave nothing half-made behind.
        pins::remove_pins(pins_dir);
    }
    loaded
}

fn load_and_attach(
    opts: &RunOptions,
    pins_dir: &Path,
    found: Pins,
) -> Result<(Dataplane, String), Error> {
    let map_dir = pins_dir.join("maps");
    std::fs::create_dir_all(&map_dir)
        .map_err(Error::io(format!("creating {}", map_dir.display())))?;
    let mut dp = Dataplane::load_with_pins(opts.load, Some(&map_dir))?;
    if found == Pins::Fresh {
        pins::write_record(&map_dir, &opts.load)?;
    }
    let msg = match dp.attach_pinned(&opts.iface, opts.mode, &pins_dir.join("link"))? {
        Some(mode) => format!("attached to {} in {} mode", opts.iface, mode.as_str()),
        None => format!(
            "attached to {}: replaced the running program, kept its maps and flows",
            opts.iface
        ),
    };
    dp.attach_hc_pinned(&opts.iface, &pins_dir.join(pins::HC_LINK))?;
    Ok((dp, msg))
}

/// Detaches the program an agent left pinned on `iface` (`--keep-on-exit`) and discards its
/// maps. Refused while an agent holds the interface's lock; nothing to detach is an error.
pub fn detach(iface: &str, bpffs: &Path) -> Result<String, Error> {
    let bpffs = bpffs.canonicalize().unwrap_or_else(|_| bpffs.to_path_buf());
    let pins_dir = pins::pin_dir(&bpffs, iface);
    let lock = AgentLock::acquire(&pins_dir, iface, Path::new("(lb detach)"))?;
    if !pins_dir.exists() {
        return Err(Error::NotFound(format!(
            "nothing is pinned for {iface} under {}: no agent left a program attached there",
            bpffs.display()
        )));
    }
    pins::remove_pins(&pins_dir);
    if pins_dir.exists() {
        return Err(Error::Kernel(format!(
            "could not remove every pin under {}: check its permissions",
            pins_dir.display()
        )));
    }
    drop(lock);
    Ok(format!(
        "detached from {iface}: program unpinned, maps discarded (forwarding on {iface} stopped)"
    ))
}

/// Runs the agent until Ctrl-C, SIGTERM or `duration`.
pub async fn run(opts: RunOptions) -> Result<(), Error> {
    opts.load.validate()?;
    let ifindex = crate::dataplane::if_index(&opts.iface)
        .ok_or_else(|| Error::NoSuchInterface(opts.iface.clone()))?;
    crate::dataplane::require_capabilities()?;
    let lb_mac = crate::net::interface_mac(&opts.iface)
        .ok_or_else(|| Error::NoSuchInterface(opts.iface.clone()))?;
    if opts.store.is_some() && opts.config.is_some() {
        return Err(Error::Invalid(
            "--config and --store exclude each other: in a fleet the configuration lives in etcd (load it there with `lb apply`)".into(),
        ));
    }
    let config = read_config(&opts.config)?;
    let sources = encap_sources(&opts)?;
    ensure_bpffs(&opts.bpffs)?;
    let bpffs = opts
        .bpffs
        .canonicalize()
        .unwrap_or_else(|_| opts.bpffs.clone());
    let pins_dir = pins::pin_dir(&bpffs, &opts.iface);
    let lock = AgentLock::acquire(&pins_dir, &opts.iface, &opts.socket)?;
    let listener = api::server::bind(&opts.socket).await?;
    let started = attach(&opts, &pins_dir);
    let (dp, msg) = match started {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&opts.socket);
            return Err(e);
        }
    };
    println!("{msg}");
    let tx_ports = TxPorts::open(&pins_dir.join("maps"))?;
    let kernel = MapsKernel::new(dp, lb_mac, sources)?;
    let agent = Agent::start(
        Box::new(kernel),
        Box::new(FileStore::new(&opts.state_file)),
        &opts.iface,
    )?;
    let agent: SharedAgent = Arc::new(agent);
    if let Some(state) = config {
        let a = agent.clone();
        let applied = tokio::task::spawn_blocking(move || a.change(|_| Ok(state)))
            .await
            .map_err(|e| Error::Kernel(e.to_string()))?;
        if let Err(e) = applied {
            let _ = std::fs::remove_file(&opts.socket);
            return Err(e);
        }
        if let Some(path) = &opts.config {
            agent.record(format!("applied {} at start", path.display()));
        }
    }
    let reporter = agent.clone();
    let neighbours = NetlinkNeighbours::start(ifindex, move |macs| {
        let a = reporter.clone();
        // Map writes may follow: off the watcher task.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = a.core().learn_macs(&macs) {
                log::warn!("applying learned MACs: {e}");
            }
        });
    })?;
    agent.set_neighbours(Box::new(neighbours));
    if let Some(addr) = opts.metrics {
        metrics::serve(addr, agent.clone()).await?;
        println!("metrics on http://{addr}/metrics");
    }
    let fleet_tasks = match &opts.store {
        None => Vec::new(),
        Some(cfg) => {
            let fleet = crate::fleet::Fleet::new(cfg.clone(), agent.store_revision())?;
            agent.set_fleet(fleet.clone());
            println!(
                "following etcd {} as node {} of cluster {} (serving revision {} until caught up)",
                cfg.endpoints.join(","),
                cfg.node,
                cfg.cluster,
                agent
                    .store_revision()
                    .map_or("none".into(), |r| r.to_string())
            );
            vec![
                tokio::spawn(fleet.clone().follow(agent.clone())),
                tokio::spawn(fleet.publish(agent.clone())),
            ]
        }
    };
    let api_task = tokio::spawn(api::server::serve(listener, agent.clone()));
    let health_task = tokio::spawn(probe::supervise(agent.clone()));
    let egress_task = tokio::spawn(egress_upkeep(agent.clone(), tx_ports, opts.iface.clone()));
    let retry_agent = agent.clone();
    let retry_task = tokio::spawn(async move {
        // Seconds between NAT sweeps.
        const NAT_SWEEP_S: u64 = 5;
        let mut swept: u64 = 0;
        let mut history_failed: Option<String> = None;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let a = retry_agent.clone();
            let retried = tokio::task::spawn_blocking(move || {
                let r = a.retry();
                (r, a.save_history())
            })
            .await;
            if let Ok((r, saved)) = retried {
                if let Err(e) = r {
                    log::warn!("the data plane is still not in line: {e}");
                }
                // Once per distinct failure (a full or read-only disk would say so every second).
                let failed = saved.err().map(|e| e.to_string());
                if let Some(e) = &failed
                    && failed != history_failed
                {
                    log::warn!("saving the second-chance history: {e}");
                }
                history_failed = failed;
            }
            swept += 1;
            if swept.is_multiple_of(NAT_SWEEP_S) {
                let a = retry_agent.clone();
                match tokio::task::spawn_blocking(move || a.nat_sweep()).await {
                    Ok(Ok((_, 0))) => {}
                    Ok(Ok((live, gone))) => {
                        log::debug!("NAT: {gone} expired connections deleted, {live} live")
                    }
                    Ok(Err(e)) => log::warn!("NAT sweep: {e}"),
                    Err(e) => log::warn!("NAT sweep: {e}"),
                }
            }
        }
    });
    // The handler exists before the ready line: whoever waits for that line may stop us
    // at once, and an uninstalled handler would let SIGTERM kill us without the final stats.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::io("installing the SIGTERM handler"))?;
    println!("serving the control API on {}", opts.socket.display());
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
            print_stats(&agent, opts.json)?;
        }
    }
    api_task.abort();
    health_task.abort();
    egress_task.abort();
    retry_task.abort();
    for t in &fleet_tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&opts.socket);
    print_stats(&agent, opts.json)?;
    if opts.keep_on_exit {
        println!(
            "left running on {} (--keep-on-exit): maps and link stay pinned under {}",
            opts.iface,
            pins_dir.display()
        );
    } else {
        // Removing the pins drops the last references: the program detaches, maps go.
        pins::remove_pins(&pins_dir);
        println!("detached from {}", opts.iface);
    }
    lock.release();
    Ok(())
}
