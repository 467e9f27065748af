//! `lb cluster status` and the store lines of `lb stats` (fleet mode). Every string that
//! came from the store (node names, digests, reasons, keys) is printed [`escaped`]: whoever
//! can write etcd must not be able to drive the operator's terminal.
use std::collections::BTreeSet;

use lb_userspace::{
    api::client::Client,
    fleet::escaped,
    protocol::{ClusterView, StoreView},
};

use super::output::{print_json, print_table};

/// What `lb stats` says about the store, first thing (a node cut off from etcd must be seen).
pub fn store_lines(s: &StoreView) -> String {
    let rev = s
        .applied_revision
        .map_or("none".to_string(), |r| r.to_string());
    let mut out = if s.connected {
        format!(
            "store: etcd {} cluster {} node {}: connected, applied revision {rev}\n",
            s.endpoints.join(","),
            s.cluster,
            s.node
        )
    } else {
        format!(
            "WARNING: store etcd {} unreachable{} ({}): forwarding with the last applied revision {rev}; changes are refused\n",
            s.endpoints.join(","),
            s.down_since_unix
                .map(|t| format!(" for {}s", now().saturating_sub(t)))
                .unwrap_or_default(),
            escaped(s.last_error.as_deref().unwrap_or("no answer"))
        )
    };
    for r in &s.rejected {
        out.push_str(&format!("WARNING: store key not applied: {}\n", escaped(r)));
    }
    for r in &s.ignored_statuses {
        out.push_str(&format!("WARNING: node status ignored: {}\n", escaped(r)));
    }
    out.push_str(&format!(
        "store counters: rejected values {}, refused revisions {}, reconnects {}, ignored statuses {}\n\n",
        s.rejected_total, s.refused_revisions_total, s.reconnects_total, s.ignored_statuses_total
    ));
    out
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub async fn status(client: &Client, json: bool) -> anyhow::Result<()> {
    let c: ClusterView = client.get("/v1/cluster").await?;
    if json {
        return print_json(&c);
    }
    println!(
        "cluster {}: configuration revision {}, {} node(s) alive",
        escaped(&c.cluster),
        c.revision,
        c.nodes.len()
    );
    let vips: BTreeSet<_> = c.nodes.iter().flat_map(|n| n.digests.keys()).collect();
    let mut headers = vec!["NODE".to_string(), "REVISION".into(), "AGE".into()];
    headers.extend(vips.iter().map(|v| format!("DIGEST {v}")));
    headers.push("DOWN (OWN PROBES)".into());
    let rows: Vec<Vec<String>> = c
        .nodes
        .iter()
        .map(|n| {
            let mut row = vec![
                escaped(&n.node),
                n.revision.to_string(),
                format!("{}s", now().saturating_sub(n.at_unix)),
            ];
            row.extend(
                vips.iter()
                    .map(|v| n.digests.get(v).map_or_else(|| "-".into(), |d| escaped(d))),
            );
            let down: Vec<String> = n
                .health
                .iter()
                .flat_map(|(v, m)| {
                    m.iter()
                        .filter(|(_, up)| !**up)
                        .map(move |(a, _)| format!("{a} ({v})"))
                })
                .collect();
            row.push(if down.is_empty() {
                "-".into()
            } else {
                down.join(", ")
            });
            row
        })
        .collect();
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    print_table(&headers, &rows);
    for n in &c.nodes {
        if let Some(a) = &n.announce {
            println!("{}", announce_line(&n.node, a));
        }
    }
    if c.divergence.is_empty() {
        println!("all nodes agree");
    } else {
        for d in &c.divergence {
            println!("DIVERGENT: {}", escaped(d));
        }
    }
    for i in &c.ignored {
        println!("IGNORED (not counted for fleet health): {}", escaped(i));
    }
    println!("status keys ignored: {}", c.ignored_total);
    Ok(())
}

/// One node's BGP announcement: each VIP's state and each session's (store strings,
/// escaped).
fn announce_line(node: &str, a: &lb_userspace::protocol::NodeAnnounce) -> String {
    let vips: Vec<String> = a
        .vips
        .iter()
        .map(|(v, s)| format!("{v} {}", escaped(s)))
        .collect();
    let sessions: Vec<String> = a
        .sessions
        .iter()
        .map(|(p, s)| format!("{} {}", escaped(p), escaped(s)))
        .collect();
    format!(
        "BGP {}: {}; sessions: {}",
        escaped(node),
        if vips.is_empty() {
            "no VIPs".into()
        } else {
            vips.join(", ")
        },
        if sessions.is_empty() {
            "none".into()
        } else {
            sessions.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's announcement comes from etcd (and its session names from that node's bird):
    /// what a writer of the store put there cannot drive the terminal.
    #[test]
    fn announce_lines_escape_what_came_from_the_store() {
        let a = lb_userspace::protocol::NodeAnnounce {
            vips: [(
                "10.0.0.10:80/tcp".parse().unwrap(),
                "withdrawn (\x1b[2J)".to_string(),
            )]
            .into(),
            sessions: [("r1\r\x1b]0;x\x07".to_string(), "established".to_string())].into(),
        };
        let line = announce_line("lb\x1b[31m0", &a);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert_eq!(
            line,
            "BGP lb\\x1b[31m0: 10.0.0.10:80/tcp withdrawn (\\x1b[2J); sessions: r1\\x0d\\x1b]0;x\\x07 established"
        );
    }
}
