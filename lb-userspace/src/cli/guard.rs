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

/// The prefixes of `lb deny add --file`: one a line, blank lines and `#` comments skipped;
/// the first bad line is the error, with its number.
fn read_prefixes(path: &std::path::Path) -> anyhow::Result<Vec<lb_userspace::model::Prefix>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let p = line
            .parse()
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        out.push(p);
    }
    Ok(out)
}

pub async fn deny(client: &Client, cmd: DenyCmd) -> anyhow::Result<()> {
    match cmd {
        DenyCmd::Add {
            mut prefixes,
            expires,
            file,
        } => {
            if let Some(f) = &file {
                prefixes.extend(read_prefixes(f)?);
            }
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

/// `lb stats --top-sources`: the sources the guard dropped most in the last minute.
pub async fn top_sources(client: &Client, json: bool) -> anyhow::Result<()> {
    let v: lb_userspace::protocol::TopSourcesView = client.get("/v1/stats/top-sources").await?;
    if json {
        return print_json(&v);
    }
    println!(
        "sources the guard dropped most in the last {} s (sampled 1 in {}: estimates)",
        v.window_s, v.sample_every
    );
    let rows: Vec<Vec<String>> = v
        .sources
        .iter()
        .map(|s| {
            let reasons: Vec<String> = s.reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
            vec![
                s.source.to_string(),
                s.dropped.to_string(),
                s.samples.to_string(),
                reasons.join(", "),
            ]
        })
        .collect();
    print_table(&["SOURCE", "DROPPED", "SAMPLES", "REASONS"], &rows);
    Ok(())
}
