//! `lb stats`: the counters, once or every second with rates, and the NAT, capture and
//! store lines around them.
use std::time::Duration;

use lb_userspace::{api::client::Client, protocol::StatsView};

use super::output::print_table;

pub(super) async fn stats(
    client: &Client,
    watch: bool,
    count: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
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
    print_notes(s);
    print_counters(s, prev);
    println!();
    print_vips(s, prev);
}

/// A counter's rise since the previous refresh, per second (empty on the first).
fn rate(now: u64, before: Option<u64>) -> String {
    before.map_or(String::new(), |b| format!("{}/s", now.saturating_sub(b)))
}

/// The lines above the tables: convergence, the store, backends without a MAC, a migration,
/// NAT's tables and addresses, the capture.
fn print_notes(s: &StatsView) {
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
}

/// The node-wide counters' table.
fn print_counters(s: &StatsView, prev: Option<&StatsView>) {
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
}

/// The per-VIP table, each VIP's backends under it.
fn print_vips(s: &StatsView, prev: Option<&StatsView>) {
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
