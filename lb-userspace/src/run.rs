//! `lb run`: wiring only. The lock, the control socket, bpffs, pinned maps and link, then the
//! [`Node`] (the agent, its fleet and background tasks) with its API and metrics listeners,
//! and a clean exit (or none, with `--keep-on-exit`).
//!
//! Order matters for "a refused start changes nothing": the interface and config are checked,
//! the per-interface lock is taken, the control socket and the metrics listener are bound and
//! the pinned maps are checked for compatibility, all before any pin is removed (`--fresh`),
//! loaded or attached: a port in use must not leave a program forwarding with no agent.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

/// Mounting bpffs belongs to the pins; named here for `lb run`'s users.
pub use crate::dataplane::pins::ensure_bpffs;
use crate::{
    AttachMode, Dataplane, Error, LoadOptions,
    agent::{Agent, state::FileStore},
    api,
    dataplane::{
        egress::TxPorts,
        kernel::{EncapSources, MapsKernel},
        migrate,
        pins::{self, AgentLock, Pins},
    },
    metrics, model,
    node::Node,
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
    /// The NAT address pool given with `--nat-source` (at most 4 per family).
    pub nat_sources: Vec<std::net::IpAddr>,
    /// The prefixes VIPs may use (`--vip-prefix`; empty: any address but the node's own).
    pub vip_pools: Vec<model::Prefix>,
    /// Fleet mode: the desired state comes from this store.
    pub store: Option<crate::fleet::FleetConfig>,
    /// `--announce-table`: VIP routes for the BGP speaker.
    pub announce: Option<crate::announce::AnnounceConfig>,
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
    let fallback: Vec<std::net::IpAddr> = [out.v4.map(Into::into), out.v6.map(Into::into)]
        .into_iter()
        .flatten()
        .collect();
    out.nat_pool = crate::nat_pool::nat_pool(&opts.nat_sources, &fallback)?;
    out.nat_pool_given = !opts.nat_sources.is_empty();
    Ok(out)
}

/// Prints the counters (read on a blocking thread: one map read per VIP and backend).
async fn print_stats(node: &Arc<Node>, json: bool) -> Result<(), Error> {
    let n = node.clone();
    let stats = tokio::task::spawn_blocking(move || n.stats())
        .await
        .map_err(|e| Error::Kernel(format!("reading the counters: {e}")))??;
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
    let fresh = matches!(found, Pins::Fresh);
    let loaded = match found {
        Pins::Migrate(plan) => migrate_and_attach(opts, pins_dir, &plan),
        _ => load_and_attach(opts, pins_dir, fresh),
    };
    if loaded.is_err() && fresh {
        // Nothing was pinned before this start: leave nothing half-made behind.
        pins::remove_pins(pins_dir);
    }
    loaded
}

fn load_and_attach(
    opts: &RunOptions,
    pins_dir: &Path,
    fresh: bool,
) -> Result<(Dataplane, String), Error> {
    let map_dir = pins_dir.join("maps");
    std::fs::create_dir_all(&map_dir)
        .map_err(Error::io(format!("creating {}", map_dir.display())))?;
    let mut dp = Dataplane::load_with_pins(opts.load, Some(&map_dir))?;
    if fresh {
        pins::write_record(&map_dir, &pins::abi_record(&opts.load))?;
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

/// Migrates the pins of the previous map ABI (`dataplane::migrate`): the new object loaded
/// beside the old maps, the first copy, the swap of both links, the difference, the commit.
/// A failure before the swap removes what was staged and leaves the old program running on
/// its maps; after it, the next start migrates again from the old maps.
fn migrate_and_attach(
    opts: &RunOptions,
    pins_dir: &Path,
    plan: &migrate::Plan,
) -> Result<(Dataplane, String), Error> {
    let map_dir = pins_dir.join("maps");
    let staged = migrate::staged_dir(&map_dir);
    let started = Instant::now();
    migrate::clear_staged(&map_dir);
    let before_swap = || -> Result<_, Error> {
        std::fs::create_dir_all(&staged)
            .map_err(Error::io(format!("creating {}", staged.display())))?;
        let dp = Dataplane::load_staged(opts.load, &map_dir, &staged, &plan.created())?;
        let (copier, first) = migrate::copy::Copier::first(plan, &map_dir)?;
        Ok((dp, copier, first))
    };
    let (mut dp, copier, first) = before_swap().inspect_err(|_| migrate::clear_staged(&map_dir))?;
    dp.attach_pinned(&opts.iface, opts.mode, &pins_dir.join("link"))
        .inspect_err(|_| migrate::clear_staged(&map_dir))?;
    dp.attach_hc_pinned(&opts.iface, &pins_dir.join(pins::HC_LINK))?;
    let second = copier.difference()?;
    let done = migrate::Done {
        from: plan.from,
        maps: plan.created().len() as u32,
        entries: first + second,
        took: started.elapsed(),
    };
    migrate::commit(plan, &map_dir, &opts.load, &done)?;
    Ok((
        dp,
        format!(
            "attached to {}: migrated the pinned maps from map ABI {} to {} ({} maps new, {} entries copied, {} of them after the swap, in {} ms) and replaced the running program",
            opts.iface,
            done.from,
            lb_common::ABI_VERSION,
            done.maps,
            done.entries,
            second,
            done.took.as_millis()
        ),
    ))
}

/// The migration the pinned record keeps, if the set was made by one.
fn migration_of(map_dir: &Path) -> Option<crate::protocol::MigrationView> {
    let r = pins::read_record(map_dir).ok()?;
    (r.migrated_from != 0).then_some(crate::protocol::MigrationView {
        from: r.migrated_from,
        to: r.version,
        maps: r.migrated_maps,
        entries: r.migrated_entries,
        took_us: r.migrated_us,
        at_unix: r.migrated_at_unix,
    })
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

/// Everything `lb run` checks before it touches anything.
struct Checked {
    ifindex: u32,
    lb_mac: [u8; 6],
    config: Option<model::DesiredState>,
    sources: EncapSources,
}

fn check(opts: &RunOptions) -> Result<Checked, Error> {
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
    if opts.store.is_some() && opts.vip_pools.is_empty() {
        return Err(Error::Invalid(
            "--store needs at least one --vip-prefix PREFIX: the node's own configuration names the addresses VIPs from the store may use (e.g. --vip-prefix 192.0.2.0/24)".into(),
        ));
    }
    Ok(Checked {
        ifindex,
        lb_mac,
        config: read_config(&opts.config)?,
        sources: encap_sources(opts)?,
    })
}

/// The agent over the attached data plane, in its node; `--config` applied (a refused
/// config stops the start).
async fn start_node(opts: &RunOptions, dp: Dataplane, c: Checked) -> Result<Arc<Node>, Error> {
    // Read before the agent starts: a failure here leaves nothing half-started.
    let own = crate::agent::own_addrs::read().await?;
    let kernel = MapsKernel::new(dp, c.lb_mac, c.sources)?;
    let agent = Agent::start(
        Box::new(kernel),
        Box::new(FileStore::new(&opts.state_file)),
        &opts.iface,
    )?;
    agent.core().set_vip_pools(opts.vip_pools.clone());
    agent.core().set_own_addrs(own);
    let node = Node::new(agent, opts.store.clone())?;
    drop_refused_vips(&node).await?;
    if let Some(state) = c.config {
        let a = node.agent().clone();
        tokio::task::spawn_blocking(move || a.apply_config(state))
            .await
            .map_err(|e| Error::Kernel(e.to_string()))??;
        if let Some(path) = &opts.config {
            node.agent()
                .record(format!("applied {} at start", path.display()));
        }
    }
    node.watch_neighbours(c.ifindex)?;
    Ok(node)
}

/// VIPs of the saved state that this node's address rules now refuse (pools narrowed, or
/// taken before pools existed) are removed at start, each logged and recorded: a VIP on the
/// node's own address must not outlive the rule that forbids it.
async fn drop_refused_vips(node: &Node) -> Result<(), Error> {
    let refused: Vec<(model::VipAddr, String)> = {
        let core = node.agent().core();
        core.desired()
            .vips
            .keys()
            .filter_map(|v| core.check_vip_address(v.ip).err().map(|why| (*v, why)))
            .collect()
    };
    if refused.is_empty() {
        return Ok(());
    }
    let gone: Vec<model::VipAddr> = refused.iter().map(|(v, _)| *v).collect();
    let a = node.agent().clone();
    tokio::task::spawn_blocking(move || {
        a.change(|d| {
            let mut d = d.clone();
            d.vips.retain(|v, _| !gone.contains(v));
            Ok(d)
        })
    })
    .await
    .map_err(|e| Error::Kernel(e.to_string()))??;
    for (vip, why) in refused {
        log::warn!("VIP {vip} of the saved state removed at start: {why}");
        node.agent().record(format!(
            "VIP {vip} of the saved state removed at start: {why}"
        ));
    }
    Ok(())
}

/// Says which store a fleet node follows.
fn announce_fleet(opts: &RunOptions, node: &Node) {
    if let Some(cfg) = &opts.store {
        println!(
            "following etcd {} as node {} of cluster {} (serving revision {} until caught up)",
            cfg.endpoints.join(","),
            cfg.node,
            cfg.cluster,
            node.agent()
                .store_revision()
                .map_or("none".into(), |r| r.to_string())
        );
    }
}

/// Prints the counters every `--interval` seconds until Ctrl-C, SIGTERM or `--duration`.
async fn wait(opts: &RunOptions, node: &Arc<Node>) -> Result<(), Error> {
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
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            _ = tokio::time::sleep(sleep) => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        if opts.interval > 0 {
            print_stats(node, opts.json).await?;
        }
    }
}

/// Runs the agent until Ctrl-C, SIGTERM or `duration`.
pub async fn run(opts: RunOptions) -> Result<(), Error> {
    let checked = check(&opts)?;
    if let Some(store) = &opts.store {
        crate::fleet::check_store(store).await?;
    }
    ensure_bpffs(&opts.bpffs)?;
    let bpffs = opts
        .bpffs
        .canonicalize()
        .unwrap_or_else(|_| opts.bpffs.clone());
    let pins_dir = pins::pin_dir(&bpffs, &opts.iface);
    let lock = AgentLock::acquire(&pins_dir, &opts.iface, &opts.socket)?;
    let listener = api::server::bind(&opts.socket).await?;
    let metrics_listener = match opts.metrics {
        None => None,
        Some(addr) => Some(metrics::bind(addr).await.inspect_err(|_| {
            let _ = std::fs::remove_file(&opts.socket);
        })?),
    };
    let (dp, msg) = attach(&opts, &pins_dir).inspect_err(|_| {
        let _ = std::fs::remove_file(&opts.socket);
    })?;
    println!("{msg}");
    let tx_ports = TxPorts::open(&pins_dir.join("maps"))?;
    let node = start_node(&opts, dp, checked).await.inspect_err(|_| {
        let _ = std::fs::remove_file(&opts.socket);
    })?;
    if let Some(m) = migration_of(&pins_dir.join("maps")) {
        node.set_migration(m);
    }
    if let Some(cfg) = opts.announce.clone() {
        let table = cfg.table;
        let a = tokio::task::spawn_blocking(move || crate::announce::Announcer::new(cfg))
            .await
            .map_err(|e| Error::Kernel(e.to_string()))
            .flatten()
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&opts.socket);
            })?;
        node.set_announcer(a);
        println!("announcing VIPs in routing table {table} for the BGP speaker");
    }
    let mut tasks = node.start(tx_ports, opts.iface.clone());
    if let (Some(l), Some(addr)) = (metrics_listener, opts.metrics) {
        tasks.push(metrics::serve(l, node.clone()));
        println!("metrics on http://{addr}/metrics");
    }
    announce_fleet(&opts, &node);
    tasks.push(tokio::spawn(api::server::serve(listener, node.clone())));
    wait(&opts, &node).await?;
    drop(tasks);
    let _ = std::fs::remove_file(&opts.socket);
    print_stats(&node, opts.json).await?;
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
