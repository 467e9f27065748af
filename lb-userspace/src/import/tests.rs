//! `lb import nginx` on the seed's configuration, real-world upstream shapes and malformed
//! files. The resolver is a table, so the tests say exactly what each name resolves to.
use std::{collections::BTreeMap, net::IpAddr};

use super::{
    Resolver,
    nginx::{Options, import},
};
use crate::model::{Forward, parse_config, render_config};

struct Table(BTreeMap<&'static str, Vec<&'static str>>);

impl Resolver for Table {
    fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        self.0
            .get(host)
            .map(|v| v.iter().map(|a| a.parse().unwrap()).collect())
            .ok_or_else(|| format!("cannot resolve {host}: unknown host"))
    }
}

fn dns() -> Table {
    Table(BTreeMap::from([
        ("localhost", vec!["127.0.0.1"]),
        ("db1.internal", vec!["10.1.0.5", "10.1.0.6"]),
    ]))
}

fn opts(vip: Option<&str>, map: &[(&str, &str)]) -> Options {
    Options {
        map_host: map
            .iter()
            .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
            .collect(),
        vip_address: vip.map(|v| v.parse().unwrap()),
        forward: Forward::L2,
    }
}

/// The seed's nginx block, verbatim.
const SEED: &str = r#"
http {
    upstream tornado {
        server localhost:8000;
        server localhost:8001;
    }

    server {
        listen 80;
        server_name example.com;

        location / {
            proxy_pass http://tornado;
        }
    }
}
"#;

#[test]
fn the_seed_needs_a_reachable_address_and_gets_nat() {
    let e = import(SEED, &opts(Some("10.0.0.10"), &[]), &dns()).unwrap_err();
    assert!(
        e.starts_with("line 4: backend localhost is 127.0.0.1"),
        "{e}"
    );
    assert!(e.contains("--map-host localhost=ADDR"), "{e}");
    let e = import(SEED, &opts(None, &[("localhost", "10.0.0.2")]), &dns()).unwrap_err();
    assert!(
        e.contains("`listen 80` has no address: give the VIP's address with --vip-address"),
        "{e}"
    );
    // Ports 8000 and 8001 behind :80: NAT, said in a note; the TOML reads back.
    let r = import(
        SEED,
        &opts(Some("10.0.0.10"), &[("localhost", "10.0.0.2")]),
        &dns(),
    )
    .unwrap();
    let toml = render_config(&r.state);
    assert!(toml.contains("forward = \"nat\""), "{toml}");
    assert!(
        toml.contains("{ address = \"10.0.0.2:8000\", weight = 100 }")
            && toml.contains("{ address = \"10.0.0.2:8001\", weight = 100 }"),
        "{toml}"
    );
    assert_eq!(parse_config(&toml).unwrap(), r.state);
    let notes = r.notes.join("\n");
    assert!(
        notes.contains("forward = \"nat\" (direct server return cannot change ports)"),
        "{notes}"
    );
    // A mode that keeps ports, asked for explicitly, is refused with the way out.
    let mut o = opts(Some("10.0.0.10"), &[("localhost", "10.0.0.2")]);
    o.forward = crate::model::Forward::Gue;
    let e = import(SEED, &o, &dns()).unwrap_err();
    assert!(
        e.contains("backend port 8000 differs from the VIP's port 80: gue forwarding keeps the port; import with --forward nat"),
        "{e}"
    );
}

#[test]
fn a_web_upstream_with_weights_down_backup_and_paths() {
    let conf = r#"
# the shop
http {
    upstream app {
        least_conn;
        keepalive 32;
        server 10.0.0.2:80 weight=3;
        server 10.0.0.3 down;          # maintenance
        server 10.0.0.4:80 backup;
        server 10.0.0.5:80 max_fails=0 slow_start=30s;
    }
    upstream api { server 10.0.1.2:80; }
    server {
        listen 10.0.0.10:80 default_server;
        location / { proxy_pass http://app; }
        location /api/ { proxy_pass http://api/; }
    }
}
"#;
    let r = import(conf, &opts(None, &[]), &dns()).unwrap();
    let toml = render_config(&r.state);
    assert_eq!(
        toml,
        "[[vip]]\naddress = \"10.0.0.10:80/tcp\"\nhealth = { kind = \"tcp\", path = \"/health\", expect_status = 200, interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 1 }\nbackend = [\n  { address = \"10.0.0.2\", weight = 300 },\n  { address = \"10.0.0.3\", weight = 100, drained = true },\n  { address = \"10.0.0.5\", weight = 100 },\n]\n\n"
    );
    assert_eq!(
        parse_config(&toml).unwrap(),
        r.state,
        "the printed config reads back"
    );
    let notes = r.notes.join("\n");
    for want in [
        "line 5: not translated: `least_conn` in upstream app",
        "line 6: not translated: `keepalive` in upstream app",
        "line 9: not translated: backup server 10.0.0.4:80 in upstream app",
        "line 10: not translated: `slow_start=30s` on server 10.0.0.5:80",
        "line 16: not translated: location /api/ -> api",
        "passive checks (max_fails=1 fail_timeout=10s)",
    ] {
        assert!(notes.contains(want), "missing `{want}` in:\n{notes}");
    }
}

#[test]
fn stream_tcp_and_udp_with_names_ip_hash_and_ipv6() {
    let conf = r#"
stream {
    upstream pg { server db1.internal:5432 max_fails=3 fail_timeout=30s; }
    upstream dns { ip_hash; server 10.2.0.2:53; server '10.2.0.3:53'; }
    server { listen 10.0.0.20:5432; proxy_pass pg; }
    server { listen 53 udp; proxy_pass dns; }
}
http {
    upstream v6 { server [2001:db8::2]:443; server [2001:db8::3]:443 weight=2; }
    server { listen [2001:db8::10]:443 ssl; location / { proxy_pass https://v6; } }
}
"#;
    let r = import(conf, &opts(Some("10.0.0.21"), &[]), &dns()).unwrap();
    let vips: Vec<String> = r.state.vips.keys().map(|v| v.to_string()).collect();
    assert_eq!(
        vips,
        [
            "10.0.0.20:5432/tcp",
            "10.0.0.21:53/udp",
            "[2001:db8::10]:443/tcp"
        ]
    );
    let pg = &r.state.vips[&"10.0.0.20:5432/tcp".parse().unwrap()];
    assert_eq!(pg.backends.len(), 2, "both addresses of db1.internal");
    assert_eq!(pg.health.as_ref().unwrap().fall, 3);
    let dns_vip = &r.state.vips[&"10.0.0.21:53/udp".parse().unwrap()];
    assert!(dns_vip.source_hash);
    let v6 = &r.state.vips[&"[2001:db8::10]:443/tcp".parse().unwrap()];
    assert_eq!(v6.backends[&"2001:db8::3".parse().unwrap()].weight, 200);
    let notes = r.notes.join("\n");
    for want in [
        "line 3: resolved db1.internal -> 10.1.0.5, 10.1.0.6",
        "ip_hash becomes source_hash",
        "line 10: TLS is terminated by nginx here",
    ] {
        assert!(notes.contains(want), "missing `{want}` in:\n{notes}");
    }
    assert_eq!(parse_config(&render_config(&r.state)).unwrap(), r.state);
}

#[test]
fn malformed_files_get_one_line_each() {
    let o = opts(Some("10.0.0.10"), &[]);
    for (conf, want) in [
        ("http { upstream a { server 10.0.0.2:80; }", "line 1"),
        (
            "include conf.d/*.conf;",
            "line 1: `include conf.d/*.conf` is not followed",
        ),
        (
            "server { listen 80; proxy_pass nowhere; }",
            "line 1: proxy_pass names `nowhere`, which is not an upstream",
        ),
        (
            "upstream a { server unix:/run/app.sock; }\nserver { listen 80; proxy_pass a; }",
            "line 1: upstream a: `unix:/run/app.sock` is a unix socket",
        ),
        (
            "upstream a { server 10.0.0.2; }\nserver { listen 80; proxy_pass http://$up; }",
            "line 2: `proxy_pass http://$up`: a target built from variables",
        ),
        (
            "upstream a { server 10.0.0.2 weight=abc; }",
            "line 1: `weight=abc`: weight must be a positive number",
        ),
        (
            "upstream a { server 10.0.0.2:99999; }",
            "line 1: `10.0.0.2:99999`: port `99999` is not 1-65535",
        ),
        (
            "upstream a { server 10.0.0.2; }",
            "no `server` block passes traffic",
        ),
        (
            "upstream a { server nohost.example; }\nserver { listen 80; proxy_pass a; }",
            "line 1: cannot resolve nohost.example",
        ),
        (
            "upstream a { server 10.0.0.2; }\nupstream a { server 10.0.0.3; }",
            "line 2: upstream a is defined twice (also at line 1)",
        ),
    ] {
        let e = import(conf, &o, &dns()).unwrap_err();
        assert!(e.contains(want), "{conf}\n=> {e}\n(wanted {want})");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}
