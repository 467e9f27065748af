//! `lb decap`'s parsing and setup script, unprivileged.
use super::{addrs::trusted_key, *};

#[test]
fn vip_files_are_read_strictly() {
    let dir = std::env::temp_dir().join(format!("lb-decap-vips-{}", std::process::id()));
    std::fs::write(&dir, "# vips\n10.0.0.10\n\n2001:db8::10 # v6\n").unwrap();
    let v = read_vip_file(&dir).unwrap();
    assert_eq!(v.len(), 2);
    std::fs::write(&dir, "10.0.0.10\nnot-an-ip\n").unwrap();
    let e = read_vip_file(&dir).unwrap_err().to_string();
    assert!(e.contains(":2: `not-an-ip`"), "{e}");
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn setup_names_every_vip() {
    let vips: BTreeSet<IpAddr> = [
        "10.0.0.10".parse().unwrap(),
        "2001:db8::10".parse().unwrap(),
    ]
    .into_iter()
    .collect();
    let s = setup_script("eth0", &vips, &BTreeSet::new());
    assert!(s.contains("ip addr add 10.0.0.10/32 dev lo"));
    assert!(s.contains("ip addr add 2001:db8::10/128 dev lo"));
    assert!(s.contains(
        "lb decap --iface eth0 --vip 10.0.0.10 --vip 2001:db8::10 --trusted-source LB_PREFIX"
    ));
    let trusted = ["10.31.0.0/16", "fd00:31::/48"]
        .iter()
        .map(|p| parse_trusted(p).unwrap())
        .collect();
    let s = setup_script("eth0", &vips, &trusted);
    assert!(
        s.contains("--trusted-source 10.31.0.0/16 --trusted-source fd00:31::/48"),
        "{s}"
    );
}

#[test]
fn trusted_sources_are_read_strictly() {
    assert_eq!(
        parse_trusted("10.31.0.0/16").unwrap().to_string(),
        "10.31.0.0/16"
    );
    assert_eq!(
        parse_trusted("10.31.0.2").unwrap().to_string(),
        "10.31.0.2/32"
    );
    assert_eq!(
        parse_trusted("fd00:31::2").unwrap().to_string(),
        "fd00:31::2/128"
    );
    assert_eq!(parse_trusted("::/0").unwrap().to_string(), "::/0");
    let e = parse_trusted("10.31.0.2/16").unwrap_err();
    assert!(e.contains("did you mean 10.31.0.0/16"), "{e}");
    for bad in ["10.31.0.0/33", "lb1", "10.31.0.0/", ""] {
        assert!(parse_trusted(bad).is_err(), "{bad}");
    }
}

#[test]
fn trie_keys_put_the_family_first() {
    let k = trusted_key(&parse_trusted("10.31.0.0/16").unwrap());
    assert_eq!(k.prefix_len(), 32 + 16);
    assert_eq!(k.data().family, 4);
    assert_eq!(k.data().addr[0].to_ne_bytes(), [10, 31, 0, 0]);
    let k = trusted_key(&parse_trusted("::/0").unwrap());
    assert_eq!((k.prefix_len(), k.data().family), (32, 6));
}
