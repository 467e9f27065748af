//! Parsing and validation of the operator's vocabulary.
use super::*;

#[test]
fn vip_addresses_round_trip() {
    for s in [
        "10.0.0.10:80/tcp",
        "[2001:db8::10]:53/udp",
        "10.0.0.20:*/tcp",
    ] {
        let v: VipAddr = s.parse().unwrap();
        assert_eq!(v.to_string(), s);
    }
    assert_eq!("10.0.0.20:0/TCP".parse::<VipAddr>().unwrap().port, 0);
}

#[test]
fn bad_vips_say_why() {
    for (s, why) in [
        ("10.0.0.10:80", "missing /tcp"),
        ("10.0.0.10/tcp", "missing :PORT"),
        ("10.0.0.10:70000/tcp", "port must be"),
        ("10.0.0.300:80/tcp", "not an IPv4"),
        ("10.0.0.10:80/sctp", "tcp or udp"),
        ("0.0.0.0:80/tcp", "unicast"),
        ("2001:db8::50:80/tcp", "needs brackets"),
    ] {
        let err = s.parse::<VipAddr>().unwrap_err();
        assert!(err.contains(why), "{s}: {err}");
    }
}

#[test]
fn macs() {
    assert_eq!(
        "02:00:00:00:00:0a".parse::<Mac>().unwrap().0,
        [2, 0, 0, 0, 0, 10]
    );
    assert!("02:00:00:00:00".parse::<Mac>().is_err());
    assert!(
        "01:00:5e:00:00:01"
            .parse::<Mac>()
            .unwrap_err()
            .contains("unicast")
    );
    assert!("zz:00:00:00:00:01".parse::<Mac>().is_err());
}

#[test]
fn config_parses_and_validates() {
    let text = r#"
        [[vip]]
        address = "10.0.0.10:80/tcp"
        health = { kind = "http", path = "/health", interval_ms = 200, timeout_ms = 100 }
        backend = [ { address = "10.0.0.2", weight = 100 }, { address = "10.0.0.3", mac = "02:00:00:00:00:03" } ]

        [[vip]]
        address = "[2001:db8::10]:53/udp"
        source_hash = true
        backend = [ { address = "2001:db8::2" } ]
    "#;
    let s = parse_config(text).unwrap();
    assert_eq!(s.vips.len(), 2);
    let v = &s.vips[&"10.0.0.10:80/tcp".parse().unwrap()];
    assert_eq!(v.backends.len(), 2);
    assert_eq!(v.health.as_ref().unwrap().rise, 2);
    assert!(s.vips[&"[2001:db8::10]:53/udp".parse().unwrap()].source_hash);
}

#[test]
fn config_errors_are_specific() {
    let cases = [
        (
            r#"[[vip]]
address = "10.0.0.10:80/tcp"
backend = [ { address = "10.0.0.2", weight = 70000 } ]"#,
            "out of range",
        ),
        (
            r#"[[vip]]
address = "10.0.0.10:80/tcp"
backend = [ { address = "2001:db8::2" } ]"#,
            "different address families",
        ),
        (
            r#"[[vip]]
address = "10.0.0.10:80/tcp"
[[vip]]
address = "10.0.0.10:80/tcp""#,
            "appears twice",
        ),
        (
            r#"[[vip]]
address = "10.0.0.10:80/tcp"
backend = [ { address = "10.0.0.2" }, { address = "10.0.0.2" } ]"#,
            "appears twice",
        ),
        (
            r#"[[vip]]
address = "10.0.0.10:*/tcp"
health = { kind = "tcp" }"#,
            "give its health check a `port`",
        ),
        (
            r#"[[vip]]
adress = "10.0.0.10:80/tcp""#,
            "unknown field",
        ),
    ];
    for (text, why) in cases {
        let err = parse_config(text).unwrap_err();
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn only_nat_moves_ports_and_it_keeps_the_family() {
    let vip: VipAddr = "10.0.0.10:80/tcp".parse().unwrap();
    let b = BackendSpec {
        weight: 100,
        mac: None,
        drained: false,
    };
    let at = |s: &str| s.parse::<BackendAddr>().unwrap();
    for f in [Forward::L2, Forward::Ipip, Forward::Gue] {
        let e = validate_backend(&vip, f, &at("10.0.0.2:8000"), &b).unwrap_err();
        assert!(e.contains("never changes ports"), "{f}: {e}");
        // The VIP's own port, written out, is the same backend as no port.
        validate_backend(&vip, f, &at("10.0.0.2:80"), &b).unwrap();
    }
    validate_backend(&vip, Forward::Nat, &at("10.0.0.2:8000"), &b).unwrap();
    let e = validate_backend(&vip, Forward::Nat, &at("[2001:db8::2]:8000"), &b).unwrap_err();
    assert!(e.contains("different address families"), "{e}");
    let e = validate_backend(
        &vip,
        Forward::Nat,
        &at("10.0.0.2:8000"),
        &BackendSpec {
            mac: Some(Mac([2; 6])),
            ..b
        },
    )
    .unwrap_err();
    assert!(e.contains("a MAC only applies to l2"), "{e}");
    // A config file says the same.
    let cfg = "[[vip]]\naddress = \"10.0.0.10:80/tcp\"\nforward = \"nat\"\nbackend = [ { address = \"10.0.0.2:8000\" }, { address = \"10.0.0.2:8001\" } ]\n";
    let s = parse_config(cfg).unwrap();
    assert_eq!(s.vips[&vip].backends.len(), 2);
    assert_eq!(parse_config(&render_config(&s)).unwrap(), s);
    let e = parse_config(&cfg.replace("forward = \"nat\"\n", "")).unwrap_err();
    assert!(e.contains("never changes ports"), "{e}");
}

#[test]
fn announce_min_serving_is_per_vip_validated_and_round_trips() {
    let text = r#"
        [[vip]]
        address = "10.0.0.10:80/tcp"
        announce_min_serving = 2
        backend = [ { address = "10.0.0.2" }, { address = "10.0.0.3" } ]

        [[vip]]
        address = "10.0.0.11:80/tcp"
        backend = [ { address = "10.0.0.2" } ]
    "#;
    let s = parse_config(text).unwrap();
    let strict: VipAddr = "10.0.0.10:80/tcp".parse().unwrap();
    let plain: VipAddr = "10.0.0.11:80/tcp".parse().unwrap();
    assert_eq!(s.vips[&strict].announce_min_serving, Some(2));
    assert_eq!(s.vips[&plain].announce_min_serving, None);
    assert_eq!(parse_config(&render_config(&s)).unwrap(), s);
    // The state file's and the etcd value's JSON: unset is left out, so older values parse.
    let json = serde_json::to_string(&s.vips[&plain]).unwrap();
    assert!(!json.contains("announce_min_serving"), "{json}");
    let back: VipSpec =
        serde_json::from_str(&serde_json::to_string(&s.vips[&strict]).unwrap()).unwrap();
    assert_eq!(back, s.vips[&strict]);
    for bad in ["0", "65536", "-1"] {
        let err = parse_config(&text.replace("= 2", &format!("= {bad}"))).unwrap_err();
        assert_eq!(
            err,
            format!(
                "config: VIP 10.0.0.10:80/tcp: announce_min_serving must be 1 to 65535 backends, not {bad}"
            )
        );
    }
    // An etcd value or an API state with 0 is refused by the same rule.
    let mut d = s.clone();
    d.vips.get_mut(&strict).unwrap().announce_min_serving = Some(0);
    assert!(d.validate().unwrap_err().contains("announce_min_serving"));
}
