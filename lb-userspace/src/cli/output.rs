//! How the CLI prints: aligned tables and JSON.
use lb_userspace::{model::Serving, protocol::VipView};

/// Prints rows as aligned columns under `headers`.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn serving_word(s: Serving) -> &'static str {
    match s {
        Serving::Serving => "serving",
        Serving::Weightless => "weight-0",
        Serving::Drained => "draining",
        Serving::Down => "down",
        Serving::NoMac => "no-mac",
    }
}

pub const BACKEND_HEADERS: [&str; 9] = [
    "VIP",
    "BACKEND",
    "WEIGHT",
    "STATE",
    "HEALTH",
    "SHARE",
    "PREV SLOTS",
    "MAC",
    "LAST CHECK",
];

pub fn backend_rows(vips: &[VipView]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for v in vips {
        for b in &v.backends {
            rows.push(vec![
                v.vip.to_string(),
                b.address.to_string(),
                b.weight.to_string(),
                serving_word(b.serving).into(),
                b.health.clone(),
                format!("{:.1}%", b.share_pct),
                b.previous_slots.to_string(),
                b.mac.clone(),
                b.last_check.clone(),
            ]);
        }
        // Removed backends that slots still name as previous (second chance).
        for r in &v.retired {
            rows.push(vec![
                v.vip.to_string(),
                r.address.to_string(),
                "-".into(),
                "retired".into(),
                "-".into(),
                "0.0%".into(),
                r.previous_slots.to_string(),
                "-".into(),
                "-".into(),
            ]);
        }
    }
    rows
}

/// One line per VIP in a second-chance window: when its last previous backend expires.
pub fn window_lines(vips: &[VipView]) -> Vec<String> {
    vips.iter()
        .filter_map(|v| {
            v.window_ends_in_s.map(|s| {
                format!(
                    "{}: second chance carries previous backends for {s} s more (window {} s)",
                    v.vip, v.second_chance_s
                )
            })
        })
        .collect()
}

pub fn vip_rows(vips: &[VipView]) -> Vec<Vec<String>> {
    vips.iter()
        .map(|v| {
            let serving = v
                .backends
                .iter()
                .filter(|b| b.serving == Serving::Serving)
                .count();
            vec![
                v.vip.to_string(),
                v.id.to_string(),
                if v.source_hash {
                    "source".into()
                } else {
                    "5-tuple".into()
                },
                v.health_check
                    .as_ref()
                    .map_or("none".into(), |h| format!("{:?}", h.kind).to_lowercase()),
                format!("{serving}/{}", v.backends.len()),
                v.forward.to_string(),
                // How long a UDP flow keeps its backend without a datagram.
                if v.vip.proto == lb_userspace::model::Proto::Udp {
                    format!("{}s", v.udp_idle_s)
                } else {
                    "-".into()
                },
                // Equal on every node that sends each flow to the same backend.
                v.digest.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect()
}
