//! `lb node drain|undrain|status`: this node's BGP announcement. Session names come from the
//! speaker's configuration and are printed escaped, as store strings are.
use lb_userspace::{
    announce::{AnnounceView, DrainRequest},
    api::client::Client,
    fleet::escaped,
};

use super::{
    args::NodeCmd,
    output::{print_json, print_table},
};

pub async fn run(client: &Client, cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Drain { withdraw_after } => {
            let req = DrainRequest {
                drain: true,
                withdraw_after_s: withdraw_after,
            };
            let v: AnnounceView = client.post("/v1/node/drain", &req).await?;
            let after = v.drain.as_ref().map_or(0, |d| d.withdraw_after_s);
            println!(
                "draining: VIPs announced with the GRACEFUL_SHUTDOWN community, withdrawn {after} s after the drain began; the node keeps forwarding what reaches it"
            );
        }
        NodeCmd::Undrain => {
            let req = DrainRequest {
                drain: false,
                withdraw_after_s: None,
            };
            let _: AnnounceView = client.post("/v1/node/drain", &req).await?;
            println!("undrained: VIPs that can serve are announced again");
        }
        NodeCmd::Status { json } => {
            let v: AnnounceView = client.get("/v1/announce").await?;
            if json {
                return print_json(&v);
            }
            print!("{}", status_text(&v));
            print_vips(&v);
        }
    }
    Ok(())
}

/// The announcement as text: the drain, the sessions, then one row per VIP.
pub fn status_text(v: &AnnounceView) -> String {
    let mut out = format!(
        "announcing in routing table {} (at least {} serving backend(s) per VIP unless it sets its own, hold-down {:.1} s), {} route change(s) since start\n",
        v.table,
        v.min_serving,
        v.hold_down_ms as f64 / 1000.0,
        v.route_changes_total
    );
    if let Some(d) = &v.drain {
        out.push_str(&format!(
            "node {} (withdrawal {} s after the drain began)\n",
            d.phase, d.withdraw_after_s
        ));
    }
    if let Some(e) = &v.table_error {
        out.push_str(&format!("WARNING: the announce table: {e}\n"));
    }
    match &v.speaker_error {
        Some(e) => out.push_str(&format!("WARNING: BGP sessions unknown: {}\n", escaped(e))),
        None if v.sessions.is_empty() => out.push_str("BGP sessions: none configured\n"),
        None => {
            let s: Vec<String> = v
                .sessions
                .iter()
                .map(|s| format!("{} {}", escaped(&s.peer), escaped(&s.state)))
                .collect();
            out.push_str(&format!("BGP sessions: {}\n", s.join(", ")));
        }
    }
    out
}

/// Rows of `lb node status`' VIP table.
pub fn print_vips(v: &AnnounceView) {
    let rows: Vec<Vec<String>> = v
        .vips
        .iter()
        .map(|a| {
            vec![
                a.vip.to_string(),
                a.state.clone(),
                a.serving.to_string(),
                a.needed.to_string(),
                a.why.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(&["VIP", "ANNOUNCE", "SERVING", "NEEDED", "WHY"], &rows);
}
