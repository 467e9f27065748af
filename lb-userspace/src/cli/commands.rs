//! Each subcommand as one small function over the API client.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use lb_userspace::{
    LoadOptions,
    api::client::{Client, encode_query},
    model::{BackendAddr, HealthCheck, HealthKind, VipAddr, parse_config},
    plan,
    protocol::{Command, CommandResult, StatsView, Trace, VipView},
    run, samples,
};

use super::{
    args::{BackendCmd, CheckKind, Cli, ClusterCmd, ImportCmd, RunArgs, Top, VipCmd},
    output::{BACKEND_HEADERS, backend_rows, print_json, print_table, vip_rows, window_lines},
};

pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Top::Run(a) => run_agent(*a, cli.socket).await,
        Top::Vip(cmd) => vip(&client, cmd).await,
        Top::Backend(cmd) => backend(&client, cmd).await,
        Top::Deny(cmd) => super::guard::deny(&client, cmd).await,
        Top::Stats {
            top_sources: true,
            json,
            ..
        } => super::guard::top_sources(&client, json).await,
        Top::Stats {
            watch, count, json, ..
        } => stats(&client, watch, count, json).await,
        Top::Trace {
            client: c,
            vip,
            dport,
            json,
        } => trace(&client, c, vip, dport, json).await,
        Top::Apply {
            file,
            dry_run,
            if_revision,
            json,
        } => apply(&client, file, dry_run, if_revision, json).await,
        Top::Cluster(ClusterCmd::Status { json }) => super::cluster::status(&client, json).await,
        Top::Node(cmd) => super::node::run(&client, cmd).await,
        Top::Import(ImportCmd::Nginx {
            file,
            map_host,
            vip_address,
            forward,
            apply,
            dry_run,
        }) => {
            let opts = lb_userspace::import::nginx::Options {
                map_host: map_host.into_iter().collect(),
                vip_address,
                forward,
            };
            import_nginx(&client, &file, &opts, apply, dry_run).await
        }
        Top::Reconcile => {
            client.command(&Command::Reconcile).await?;
            println!("the kernel maps match the desired state");
            Ok(())
        }
        Top::Completions { shell } => {
            let mut cmd = <super::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "lb", &mut std::io::stdout());
            Ok(())
        }
        Top::Man { out } => {
            std::fs::create_dir_all(&out)?;
            let cmd = <super::Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, &out)?;
            println!("man pages written to {}", out.display());
            Ok(())
        }
        Top::Decap(d) => super::decap::run(d).await,
        Top::Capture(a) => super::capture::run(&client, *a).await,
        Top::Detach { iface, bpffs } => {
            println!("{}", lb_userspace::run::detach(&iface, &bpffs)?);
            Ok(())
        }
        Top::XdpPass { iface } => xdp_pass(&iface).await,
        Top::Upgrade {
            check,
            iface,
            bpffs,
        } => super::upgrade::run(check, &iface, &bpffs),
        Top::Samples {
            count,
            base_port,
            bind,
            first_index,
            duration,
        } => {
            let addrs = samples::start(count, base_port, bind, first_index).await?;
            for (i, a) in addrs.iter().enumerate() {
                println!("backend {} listening on {a} (http, udp)", first_index + i);
            }
            match duration {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => tokio::signal::ctrl_c().await?,
            }
            Ok(())
        }
    }
}

async fn run_agent(a: RunArgs, socket: PathBuf) -> anyhow::Result<()> {
    let state_file = a
        .state_file
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/xdp-lb/{}.json", a.iface)));
    // Beside the state file: the drain belongs to this node's agent as its state does.
    let drain_file = state_file.with_extension("drain.json");
    let opts = run::RunOptions {
        iface: a.iface,
        mode: a.mode,
        load: LoadOptions {
            ring_size: a.ring_size,
            max_vips: a.max_vips,
            max_backends: a.max_backends,
            flow_entries: a.flow_entries,
            hash_seed: a.hash_seed,
            per_cpu_flows: a.per_cpu_flows,
            flow_table_off: a.flow_table == "off",
            fin_grace_s: a.fin_grace,
            gue_port: a.gue_port,
            nat_ports: a.nat_ports,
            flow_cache_slots: a.flow_cache_slots,
            nat_entries: a.nat_entries,
            nat_half_open_s: a.nat_half_open,
            nat_tcp_idle_s: a.nat_tcp_idle,
            nat_grace_s: a.nat_close_grace,
            nat_half_share_pct: a.nat_half_open_share,
            ipip_prefix4: a.ipip_source_prefix.iter().find_map(|p| match p {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }),
            ipip_prefix6: a.ipip_source_prefix.iter().find_map(|p| match p {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            }),
        },
        encap_sources: a.encap_source,
        nat_sources: a.nat_source,
        vip_pools: a.vip_prefix,
        config: a.config,
        state_file,
        socket,
        bpffs: a.bpffs,
        metrics: a.metrics,
        keep_on_exit: a.keep_on_exit,
        fresh: a.fresh,
        interval: a.interval,
        duration: a.duration,
        json: a.json,
        store: match (&a.store, &a.cluster) {
            (Some(url), Some(cluster)) => {
                let node = match a.node {
                    Some(n) => n,
                    None => nix_hostname()?,
                };
                let access = lb_userspace::fleet::access::AccessArgs {
                    ca: a.store_ca,
                    cert: a.store_cert,
                    key: a.store_key,
                    user: a.store_user,
                    password_file: a.store_password_file,
                };
                Some(
                    lb_userspace::fleet::FleetConfig::new(url, &access, cluster, &node)
                        .map_err(lb_userspace::Error::Invalid)?,
                )
            }
            _ => None,
        },
        announce: a
            .announce_table
            .map(|table| lb_userspace::announce::AnnounceConfig {
                table,
                min_serving: a.announce_min_serving as usize,
                hold_down: Duration::from_secs_f64(a.announce_hold_down),
                drain_time: Duration::from_secs(a.drain_time),
                speaker: Some(a.bgp_socket.clone()),
                drain_file: drain_file.clone(),
            }),
    };
    run::run(opts).await?;
    Ok(())
}

async fn vip(client: &Client, cmd: VipCmd) -> anyhow::Result<()> {
    match cmd {
        VipCmd::Add {
            vip,
            source_hash,
            health,
            health_path,
            health_status,
            health_port,
            interval_ms,
            timeout_ms,
            rise,
            fall,
            udp_idle,
            forward,
            second_chance,
            allow_sources,
            deny_sources,
            new_flow_limit,
            source_limit,
            announce_min_serving,
        } => {
            let health = health.map(|k| HealthCheck {
                kind: match k {
                    CheckKind::Tcp => HealthKind::Tcp,
                    CheckKind::Http => HealthKind::Http,
                },
                port: health_port,
                path: health_path,
                expect_status: health_status,
                interval_ms,
                timeout_ms,
                rise,
                fall,
            });
            client
                .command(&Command::AddVip {
                    vip,
                    source_hash,
                    udp_idle_s: udp_idle,
                    forward,
                    second_chance_s: second_chance,
                    health,
                    allow_sources,
                    deny_sources,
                    new_flow_limit,
                    source_limit,
                    announce_min_serving,
                })
                .await?;
            println!("added VIP {vip}");
        }
        VipCmd::Remove { vip } => {
            client.command(&Command::RemoveVip { vip }).await?;
            println!("removed VIP {vip}");
        }
        VipCmd::List { json } => {
            let vips: Vec<VipView> = client.get("/v1/vips").await?;
            if json {
                return print_json(&vips);
            }
            let mut headers = vec![
                "VIP", "ID", "HASH", "HEALTH", "SERVING", "FORWARD", "UDP IDLE", "DIGEST",
            ];
            let mut rows = vip_rows(&vips);
            // An agent announcing by BGP adds each VIP's announcement and why.
            if let Ok(a) = client
                .get::<lb_userspace::announce::AnnounceView>("/v1/announce")
                .await
            {
                headers.push("ANNOUNCE");
                for (row, v) in rows.iter_mut().zip(&vips) {
                    row.push(
                        a.vips
                            .iter()
                            .find(|x| x.vip == v.vip)
                            .map_or_else(|| "-".into(), |x| x.state_line()),
                    );
                }
            }
            print_table(&headers, &rows);
        }
    }
    Ok(())
}

/// Says which backends of a change have no MAC yet.
fn report_no_mac(r: &CommandResult) {
    for a in &r.no_mac {
        println!(
            "note: backend {a} has no MAC yet (not in the neighbour table): it takes no traffic until it answers ARP/ND, or give it with --mac"
        );
    }
}

async fn backend(client: &Client, cmd: BackendCmd) -> anyhow::Result<()> {
    match cmd {
        BackendCmd::Add {
            vip,
            address,
            weight,
            mac,
        } => {
            let r = client
                .command(&Command::AddBackend {
                    vip,
                    address,
                    weight,
                    mac,
                })
                .await?;
            println!("added backend {address} to {vip} (weight {weight})");
            report_no_mac(&r);
        }
        BackendCmd::Remove { vip, address } => {
            client
                .command(&Command::RemoveBackend { vip, address })
                .await?;
            println!("removed backend {address} from {vip}");
        }
        BackendCmd::Weight {
            vip,
            address,
            weight,
        } => {
            client
                .command(&Command::SetWeight {
                    vip,
                    address,
                    weight,
                })
                .await?;
            println!("backend {address} of {vip} now has weight {weight}");
        }
        BackendCmd::Drain { vip, address, undo } => {
            client
                .command(&Command::Drain {
                    vip,
                    address,
                    drained: !undo,
                })
                .await?;
            let now = if undo {
                "takes new flows again"
            } else {
                "is draining"
            };
            println!("backend {address} of {vip} {now}");
        }
        BackendCmd::List { vip, json } => {
            let mut vips: Vec<VipView> = client.get("/v1/vips").await?;
            if let Some(vip) = vip {
                vips.retain(|v| v.vip == vip);
                if vips.is_empty() {
                    return Err(lb_userspace::Error::NotFound(format!(
                        "unknown VIP {vip}: see `lb vip list`"
                    ))
                    .into());
                }
            }
            if json {
                return print_json(&vips);
            }
            print_table(&BACKEND_HEADERS, &backend_rows(&vips));
            for line in window_lines(&vips) {
                println!("{line}");
            }
        }
    }
    Ok(())
}

async fn trace(
    client: &Client,
    c: std::net::SocketAddr,
    vip: VipAddr,
    dport: Option<u16>,
    json: bool,
) -> anyhow::Result<()> {
    let dport = dport.map(|p| format!("&dport={p}")).unwrap_or_default();
    let t: Trace = client
        .get(&format!(
            "/v1/trace?src={}&sport={}&vip={}{dport}",
            encode_query(&c.ip().to_string()),
            c.port(),
            encode_query(&vip.to_string())
        ))
        .await?;
    if json {
        return print_json(&t);
    }
    let show = |a: Option<BackendAddr>| a.map_or("-".to_string(), |a| a.to_string());
    print_table(
        &[
            "VIP",
            "VIP ID",
            "SLOT",
            "SLOT BACKEND",
            "PREVIOUS (NEXT HOPS)",
            "FLOW ENTRY",
            "NEXT PACKET TO",
            "FORWARD",
            "OUTER HEADER",
        ],
        &[vec![
            t.vip.to_string(),
            t.vip_id.to_string(),
            t.slot.to_string(),
            show(t.slot_backend),
            if t.previous_backends.is_empty() {
                "-".to_string()
            } else {
                t.previous_backends
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
            show(t.flow_backend),
            show(t.next_packet_to),
            t.forward.to_string(),
            t.outer.as_ref().map_or("-".to_string(), |o| match o.udp {
                Some((sport, dport)) => format!("{} -> {} udp {sport} -> {dport}", o.src, o.dst),
                None => format!("{} -> {}", o.src, o.dst),
            }),
        ]],
    );
    Ok(())
}

async fn apply(
    client: &Client,
    file: PathBuf,
    dry_run: bool,
    if_revision: Option<i64>,
    json: bool,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let state = parse_config(&text).map_err(lb_userspace::Error::Invalid)?;
    let r = client
        .command(&Command::Apply {
            state,
            dry_run,
            if_revision,
        })
        .await?;
    if json {
        return print_json(&r);
    }
    print!("{}", plan::render(&r.plan));
    println!(
        "{}",
        match (dry_run, r.revision) {
            (true, None) => "dry run: nothing changed".to_string(),
            (true, Some(rev)) => format!(
                "dry run at revision {rev}: nothing changed (apply exactly this with --if-revision {rev})"
            ),
            (false, None) => "applied".to_string(),
            (false, Some(rev)) => format!("applied: revision {rev}"),
        }
    );
    report_no_mac(&r);
    Ok(())
}

async fn xdp_pass(iface: &str) -> anyhow::Result<()> {
    let tiny = LoadOptions {
        ring_size: 7,
        max_vips: 1,
        max_backends: 2,
        flow_entries: 1,
        flow_cache_slots: 0,
        ..LoadOptions::default()
    };
    let _pass = lb_userspace::dataplane::attach_pass_alone(iface, &tiny)?;
    // Handler before the ready line (see `run`).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    println!("XDP_PASS attached to {iface}");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

async fn stats(client: &Client, watch: bool, count: Option<u64>, json: bool) -> anyhow::Result<()> {
    let mut prev: Option<StatsView> = None;
    let mut n = 0u64;
    loop {
        let s: StatsView = client.get("/v1/stats").await?;
        if json {
            println!("{}", serde_json::to_string(&s)?);
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print_stats(&s, prev.as_ref());
        }
        n += 1;
        if !watch || count.is_some_and(|c| n >= c) {
            break;
        }
        prev = Some(s);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// The `NAT table` line: how full each part is.
fn nat_table_line(t: &lb_userspace::protocol::NatTableView) -> String {
    let pct = |n: u64, of: u64| (n * 100).checked_div(of).unwrap_or(0);
    format!(
        "NAT table: established {} of {} ({}%, {} closing), half-open {} of {} ({}%)",
        t.established,
        t.capacity,
        pct(t.established, t.capacity),
        t.closing,
        t.half_open,
        t.half_slots,
        pct(t.half_open, t.half_slots)
    )
}

/// `lb stats`' line for the running or last capture.
fn capture_line(c: &lb_userspace::capture::wire::CaptureStatus) -> String {
    format!(
        "capture: {}, {} records, {} missed, {} sampled out",
        if c.running {
            "running"
        } else {
            "none running (the last one's counts)"
        },
        c.counts.emitted,
        c.counts.missed,
        c.counts.sampled_out
    )
}

fn print_stats(s: &StatsView, prev: Option<&StatsView>) {
    let rate = |now: u64, before: Option<u64>| {
        before.map_or(String::new(), |b| format!("{}/s", now.saturating_sub(b)))
    };
    if let Some(why) = &s.agent.not_converged {
        println!("WARNING: the data plane does not match the desired state yet: {why}\n");
    }
    if let Some(st) = &s.store {
        print!("{}", super::cluster::store_lines(st));
    }
    if !s.agent.no_mac.is_empty() {
        let list: Vec<String> = s.agent.no_mac.iter().map(|a| a.to_string()).collect();
        println!("backends without a MAC (no traffic): {}\n", list.join(", "));
    }
    if let Some(m) = &s.agent.migration {
        println!("{}\n", super::upgrade::migration_line(m));
    }
    if let Some((live, cap)) = s.agent.nat_connections {
        println!("NAT connections: {live} of {cap} (closed ones keep their port 70 s)");
        if let Some(t) = s.agent.nat_table {
            println!("{}", nat_table_line(&t));
        }
        for a in &s.agent.nat_pool {
            println!(
                "NAT address {}: {} connections ({} half-open, {} closing)",
                a.address, a.connections, a.half_open, a.closing
            );
            println!("{}", nat_addr_detail(a));
        }
        println!();
    }
    if let Some(c) = &s.capture {
        println!("{}\n", capture_line(c));
    }
    let mut rows = Vec::new();
    for (k, c) in &s.global {
        let before = prev.and_then(|p| p.global.get(k)).map(|c| c.packets);
        rows.push(vec![
            k.clone(),
            c.packets.to_string(),
            c.bytes.to_string(),
            rate(c.packets, before),
        ]);
    }
    print_table(&["COUNTER", "PACKETS", "BYTES", "RATE"], &rows);
    println!();
    let mut rows = Vec::new();
    for v in &s.vips {
        let pv = prev.and_then(|p| p.vips.iter().find(|x| x.vip == v.vip));
        rows.push(vec![
            v.vip.to_string(),
            "-".into(),
            v.packets.to_string(),
            v.bytes.to_string(),
            v.new_flows.to_string(),
            rate(v.new_flows, pv.map(|x| x.new_flows)),
            v.guard_dropped.to_string(),
            rate(v.guard_dropped, pv.map(|x| x.guard_dropped)),
            rate(v.packets, pv.map(|x| x.packets)),
        ]);
        for b in &v.backends {
            let pb = pv.and_then(|x| x.backends.iter().find(|y| y.address == b.address));
            rows.push(vec![
                String::new(),
                b.address.to_string(),
                b.packets.to_string(),
                b.bytes.to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                rate(b.packets, pb.map(|y| y.packets)),
            ]);
        }
    }
    print_table(
        &[
            "VIP",
            "BACKEND",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "NEW/S",
            "GUARD DROPS",
            "DROPS/S",
            "RATE",
        ],
        &rows,
    );
}

/// This host's name (the default node name in a fleet).
fn nix_hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_string())
}

/// `lb import nginx`: notes on stderr (one line each), the config on stdout, or applied.
async fn import_nginx(
    client: &Client,
    file: &std::path::Path,
    opts: &lb_userspace::import::nginx::Options,
    apply: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let name = file.display();
    let imported =
        lb_userspace::import::nginx::import(&text, opts, &lb_userspace::import::SystemResolver)
            .map_err(|e| lb_userspace::Error::Invalid(format!("{name}: {e}")))?;
    for n in &imported.notes {
        eprintln!("{name}: {n}");
    }
    if !apply {
        print!("{}", lb_userspace::model::render_config(&imported.state));
        return Ok(());
    }
    let r = client
        .command(&Command::Apply {
            state: imported.state,
            dry_run,
            if_revision: None,
        })
        .await?;
    print!("{}", plan::render(&r.plan));
    println!(
        "{}",
        if dry_run {
            "dry run: nothing changed"
        } else {
            "applied"
        }
    );
    report_no_mac(&r);
    Ok(())
}

/// The second line of a NAT address in `lb stats`: its ports in use per backend and its
/// refusals by reason.
fn nat_addr_detail(a: &lb_userspace::protocol::NatAddrView) -> String {
    let ports: Vec<String> = a
        .ports_by_backend
        .iter()
        .map(|b| format!("{} {}", b.backend, b.ports))
        .collect();
    format!(
        "  ports in use: {}; refused: {} no free port, {} table full",
        if ports.is_empty() {
            "none".into()
        } else {
            ports.join(", ")
        },
        a.refused_no_port,
        a.refused_table_full
    )
}
