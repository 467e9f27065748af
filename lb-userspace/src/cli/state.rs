//! `lb vip` and `lb backend`: changes to the desired state and its listings.
use lb_userspace::{
    api::client::Client,
    model::{HealthCheck, HealthKind},
    protocol::{Command, CommandResult, VipView},
};

use super::{
    args::{BackendCmd, CheckKind, VipCmd},
    output::{BACKEND_HEADERS, backend_rows, print_json, print_table, vip_rows, window_lines},
};

pub(super) async fn vip(client: &Client, cmd: VipCmd) -> anyhow::Result<()> {
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
pub(super) fn report_no_mac(r: &CommandResult) {
    for a in &r.no_mac {
        println!(
            "note: backend {a} has no MAC yet (not in the neighbour table): it takes no traffic until it answers ARP/ND, or give it with --mac"
        );
    }
}

pub(super) async fn backend(client: &Client, cmd: BackendCmd) -> anyhow::Result<()> {
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
