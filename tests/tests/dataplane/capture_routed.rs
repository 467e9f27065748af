//! `lb capture --both` on the routed network (`lb_tests::routed`): the frames as they left
//! show the IPIP and GUE outer headers to the backend, and NAT's translated addresses and
//! ports in both directions.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use lb_tests::{
    proc::sample_backend,
    routed::{CLIENT4, Routed, VIP_MIXED, VIP4, VIP6, backend_dev, backend4, backend6},
    topo::{get, http_request},
};

use super::capture::{capture_during, comment_of, out_file, tshark_fields};

const FIELDS: [&str; 11] = [
    "frame.interface_id",
    "ip.src",
    "ip.dst",
    "ip.proto",
    "ipv6.src",
    "ipv6.dst",
    "udp.dstport",
    "tcp.srcport",
    "tcp.dstport",
    "frame.comment",
    "eth.dst",
];

/// One packet's fields by name.
struct Row(Vec<String>);

impl Row {
    fn get(&self, field: &str) -> &str {
        let i = FIELDS
            .iter()
            .position(|f| *f == field)
            .expect("a field asked for");
        &self.0[i]
    }
    fn left(&self) -> bool {
        self.get("frame.interface_id") == "1"
    }
}

/// Captures `args` while the client makes `n` requests to `vip`:80; the packets.
fn capture(net: &Routed, args: &[&str], vip: &str, n: usize) -> anyhow::Result<Vec<Row>> {
    let file = out_file(&net.dir, "routed");
    let file_s = file.display().to_string();
    let mut all = vec!["-w", file_s.as_str(), "--duration", "20s"];
    all.extend_from_slice(args);
    let target = std::net::SocketAddr::new(vip.parse()?, 80);
    let out = capture_during(&net.dir, &all, || {
        for _ in 0..n {
            http_request(&net.client, target, &get("/"))?;
        }
        Ok(())
    })?;
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(tshark_fields(&file, &FIELDS)?
        .into_iter()
        .map(Row)
        .collect())
}

#[test]
fn encapsulated_and_translated_frames_as_they_left() -> anyhow::Result<()> {
    let mut net = Routed::new("cap")?;
    net.start_sample(1)?;
    net.decap(1, &[])?;
    // NAT's backend: an app on port 8000 of backend 1, answering with full checksums.
    net.backends[0].exec("ethtool", &["-K", &backend_dev(1), "tx", "off"])?;
    let app = sample_backend(&net.backends[0], 8000, 7)?;
    net.procs.push(app);
    net.start_agent(&[])?;
    let ipip = format!("{VIP4}:80/tcp");
    let gue = format!("[{VIP6}]:80/tcp");
    let nat = format!("{VIP_MIXED}:80/tcp");
    let nat_backend = format!("{}:8000", backend4(1));
    for (vip, mode, backend) in [
        (&ipip, "ipip", backend4(1)),
        (&gue, "gue", backend6(1)),
        (&nat, "nat", nat_backend.clone()),
    ] {
        net.lb(&["vip", "add", vip, "--forward", mode])?;
        net.lb(&["backend", "add", vip, &backend])?;
    }

    // IPIP: outer IPv4 from the load balancer to the backend, protocol 4, the client's
    // packet to the VIP inside.
    let rows = capture(&net, &["--vip", &ipip, "--both", "-c", "10"], VIP4, 4)?;
    let left: Vec<&Row> = rows.iter().filter(|r| r.left()).collect();
    assert_eq!(left.len(), 10, "each forwarded packet also as it left");
    for r in &left {
        let dst: Vec<&str> = r.get("ip.dst").split(',').collect();
        let src: Vec<&str> = r.get("ip.src").split(',').collect();
        assert_eq!(dst, [backend4(1).as_str(), VIP4], "outer then inner");
        assert_eq!(src[1], CLIENT4);
        assert_eq!(r.get("ip.proto"), "4,6", "IPIP carrying TCP");
        assert_eq!(comment_of(r.get("frame.comment"))["backend"], backend4(1));
    }

    // The same IPIP packets on the backend's side: `lb decap --capture`.
    decap_capture(&net)?;

    // GUE: outer IPv6 and UDP to the GUE port, to the backend's IPv6 address.
    let rows = capture(&net, &["--vip", &gue, "--both", "-c", "10"], VIP6, 4)?;
    let left: Vec<&Row> = rows.iter().filter(|r| r.left()).collect();
    assert_eq!(left.len(), 10);
    for r in &left {
        let dst: Vec<&str> = r.get("ipv6.dst").split(',').collect();
        assert_eq!(dst[0], backend6(1), "the outer header goes to the backend");
        assert_eq!(
            r.get("udp.dstport"),
            lb_common::DEFAULT_GUE_PORT.to_string(),
            "GUE's UDP port"
        );
        assert_eq!(comment_of(r.get("frame.comment"))["backend"], backend6(1));
    }

    // NAT, both directions: the client's packets leave from the NAT address to the app's
    // port; the app's answers leave from the VIP to the client.
    let rows = capture(
        &net,
        &["--verdict", "forwarded", "--both", "-c", "30"],
        VIP_MIXED,
        4,
    )?;
    // Each CPU's records come in order: a packet as it arrived, then as it left.
    let mut by_cpu: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in &rows {
        let cpu = comment_of(r.get("frame.comment"))["cpu"].clone();
        by_cpu.entry(cpu).or_default().push(r);
    }
    let mut seen = BTreeSet::new();
    // What `lb trace` names for the client's flow on port `cport`: the VIP and backend
    // every NAT frame of that flow must carry, both directions.
    let traced = |cport: &str| -> anyhow::Result<(String, String)> {
        let t: serde_json::Value = serde_json::from_str(&net.lb(&[
            "trace",
            "--json",
            &format!("{CLIENT4}:{cport}"),
            &nat,
        ])?)?;
        Ok((
            t["vip"].as_str().context("trace's vip")?.to_string(),
            t["next_packet_to"]
                .as_str()
                .context("trace's backend")?
                .to_string(),
        ))
    };
    let mut annotated = 0;
    for pair in by_cpu.values().flat_map(|v| v.chunks(2)) {
        let (a, l) = (pair[0], pair[1]);
        assert!(!a.left() && l.left(), "arrived, then left");
        let to = |r: &Row| {
            (
                r.get("ip.src").to_string(),
                r.get("tcp.srcport").to_string(),
                r.get("ip.dst").to_string(),
                r.get("tcp.dstport").to_string(),
            )
        };
        let (asrc, asport, adst, aport) = to(a);
        let (lsrc, lsport, ldst, lport) = to(l);
        // The client's port: its packet's source, or the answer's destination as it left.
        let cport = if asrc == CLIENT4 { &asport } else { &lport };
        if asrc == CLIENT4 || asrc == backend4(1) {
            let (vip, backend) = traced(cport)?;
            for r in [a, l] {
                let c = comment_of(r.get("frame.comment"));
                assert_eq!(
                    (c["vip"].as_str(), c["backend"].as_str()),
                    (vip.as_str(), backend.as_str()),
                    "a NAT frame names what lb trace names: {}",
                    r.get("frame.comment")
                );
            }
            annotated += 1;
        }
        if asrc == CLIENT4 && adst == VIP_MIXED && aport == "80" {
            assert_eq!(
                (ldst.as_str(), lport.as_str()),
                (backend4(1).as_str(), "8000")
            );
            assert_ne!(lsrc, CLIENT4, "the source is translated to the NAT address");
            seen.insert("to the backend");
        } else if asrc == backend4(1) {
            assert_eq!(
                (lsrc.as_str(), lsport.as_str(), ldst.as_str()),
                (VIP_MIXED, "80", CLIENT4),
                "the answer leaves from the VIP to the client"
            );
            seen.insert("to the client");
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["to the backend", "to the client"],
        "NAT's two directions as they left"
    );
    assert!(
        annotated >= 10,
        "NAT pairs checked against lb trace: {annotated}"
    );
    Ok(())
}

/// A child killed and reaped on every path.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lb decap --capture --both` on backend 1 while the client makes IPIP requests: each
/// packet as it reached the backend (the load balancer's outer IPv4 header, protocol 4, the
/// client's packet inside) and as the decap program left it (the inner packet alone, from
/// the client to the VIP), annotated `decapsulated`; `tcpdump` reads the file too.
fn decap_capture(net: &Routed) -> anyhow::Result<()> {
    let file = out_file(&net.dir, "decap");
    let mut cmd: Command = net.backends[0].lb()?;
    cmd.args(["decap", "--iface", &backend_dev(1), "--bpffs"])
        .arg(&net.dir.bpffs)
        .args(["--capture", "-w"])
        .arg(&file)
        .args([
            "--both",
            "--reason",
            "decapsulated",
            "-c",
            "6",
            "--duration",
            "20s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = Reaped(cmd.spawn().context("spawning lb decap --capture")?);
    // The file is made once the kernel side records.
    let start = Instant::now();
    while !file.exists() {
        if child.0.try_wait()?.is_some() {
            let mut err = String::new();
            child
                .0
                .stderr
                .take()
                .context("stderr")?
                .read_to_string(&mut err)?;
            bail!("lb decap --capture exited before it ran: {err}");
        }
        ensure!(
            start.elapsed() < Duration::from_secs(15),
            "no capture within 15 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let target = std::net::SocketAddr::new(VIP4.parse()?, 80);
    for _ in 0..4 {
        http_request(&net.client, target, &get("/"))?;
    }
    let status = loop {
        if let Some(st) = child.0.try_wait()? {
            break st;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "lb decap --capture did not end by its count"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut err)?;
    ensure!(status.success(), "lb decap --capture: {err}");
    assert!(err.contains("6 packets captured"), "{err}");
    assert_eq!(
        std::fs::metadata(&file)?.permissions().mode() & 0o777,
        0o600
    );
    let rows: Vec<Row> = tshark_fields(&file, &FIELDS)?
        .into_iter()
        .map(Row)
        .collect();
    let (left, arrived): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| r.left());
    assert_eq!(
        (arrived.len(), left.len()),
        (6, 6),
        "each packet as it arrived and as it left"
    );
    for r in &arrived {
        let dst: Vec<&str> = r.get("ip.dst").split(',').collect();
        assert_eq!(dst, [backend4(1).as_str(), VIP4], "outer then inner");
        assert_eq!(r.get("ip.proto"), "4,6", "IPIP carrying TCP");
    }
    for r in &left {
        assert_eq!(
            (r.get("ip.src"), r.get("ip.dst"), r.get("ip.proto")),
            (CLIENT4, VIP4, "6"),
            "the outer header stripped"
        );
    }
    for r in &rows {
        let c = comment_of(r.get("frame.comment"));
        assert_eq!(
            (c["verdict"].as_str(), c["reason"].as_str()),
            ("passed", "decapsulated"),
            "{}",
            r.get("frame.comment")
        );
        assert!(r.get("frame.comment").starts_with("lb decap: "));
    }
    let td = Command::new("tcpdump")
        .arg("-nr")
        .arg(&file)
        .output()
        .context("running tcpdump")?;
    ensure!(
        td.status.success(),
        "{}",
        String::from_utf8_lossy(&td.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&td.stdout).lines().count(), 12);
    Ok(())
}
