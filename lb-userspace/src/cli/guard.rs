//! `lb deny`: the node-wide deny list.
use lb_userspace::{
    agent::guard::{live_denies, unix_now_s},
    api::client::Client,
    model::DesiredState,
    protocol::Command,
};
use serde::Serialize;

use super::{
    args::DenyCmd,
    output::{print_json, print_table},
};

/// One entry of `lb deny list --json`.
#[derive(Serialize)]
struct DenyView {
    prefix: String,
    /// Seconds left; absent: never ends.
    expires_in_s: Option<u64>,
}

pub async fn deny(client: &Client, cmd: DenyCmd) -> anyhow::Result<()> {
    match cmd {
        DenyCmd::Add { prefixes, expires } => {
            let n = prefixes.len();
            client
                .command(&Command::DenyAdd {
                    prefixes,
                    expires_s: expires,
                })
                .await?;
            match expires {
                Some(s) => println!("denied {n} prefix(es) for {s}s on every VIP"),
                None => println!("denied {n} prefix(es) on every VIP"),
            }
        }
        DenyCmd::Remove { prefixes } => {
            let n = prefixes.len();
            client.command(&Command::DenyRemove { prefixes }).await?;
            println!("removed {n} prefix(es) from the deny list");
        }
        DenyCmd::List { json } => {
            let state: DesiredState = client.get("/v1/state").await?;
            let list: Vec<DenyView> = live_denies(&state, unix_now_s())
                .into_iter()
                .map(|(p, left)| DenyView {
                    prefix: p.to_string(),
                    expires_in_s: left,
                })
                .collect();
            if json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|d| {
                    vec![
                        d.prefix.clone(),
                        d.expires_in_s
                            .map_or_else(|| "never".to_string(), |s| format!("{s}s")),
                    ]
                })
                .collect();
            print_table(&["PREFIX", "EXPIRES IN"], &rows);
        }
    }
    Ok(())
}
