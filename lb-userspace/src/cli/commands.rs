//! Each subcommand as one small function over the API client: `execute` dispatches, to the
//! functions here or to the subcommand's own module (`run`, `state`, `stats`, `guard`, ...).
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use lb_userspace::{
    LoadOptions,
    api::client::{Client, encode_query},
    model::{BackendAddr, VipAddr, parse_config},
    plan,
    protocol::{Command, Trace},
    samples,
};

use super::{
    args::{Cli, ClusterCmd, ImportCmd, Top},
    output::{print_json, print_table},
    state::report_no_mac,
};

pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Top::Run(a) => super::run::run_agent(*a, cli.socket).await,
        Top::Vip(cmd) => super::state::vip(&client, cmd).await,
        Top::Backend(cmd) => super::state::backend(&client, cmd).await,
        Top::Deny(cmd) => super::guard::deny(&client, cmd).await,
        Top::Stats {
            top_sources: true,
            json,
            ..
        } => super::guard::top_sources(&client, json).await,
        Top::Stats {
            watch, count, json, ..
        } => super::stats::stats(&client, watch, count, json).await,
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
