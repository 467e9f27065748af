//! `lb capture` on the demo network: the real agent and program, real clients, the pcapng
//! read by `tshark` and `tcpdump` (installed by `cargo xtask setup`).
use std::{
    collections::BTreeMap,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_tests::{
    ChildGuard,
    agent::AgentDir,
    lb_binary,
    topo::{CLIENT_IP, DemoNet, PORT, VIP, backend_ip},
    unique_name,
};
use lb_userspace::capture::wire::CaptureStatus;

fn tcp_vip() -> String {
    format!("{VIP}:{PORT}/tcp")
}

fn vip_ip() -> IpAddr {
    VIP.parse().expect("literal")
}

pub(crate) fn serving(backends: usize) -> anyhow::Result<DemoNet> {
    let mut net = DemoNet::build(backends, "native")?;
    net.start_backends()?;
    net.start_agent(&[])?;
    let all: Vec<usize> = (0..backends).collect();
    net.add_vip(&tcp_vip(), &all, &[])?;
    Ok(net)
}

/// A file in the agent's private directory (removed with it).
pub(crate) fn out_file(dir: &AgentDir, what: &str) -> PathBuf {
    dir.dir.join(format!("{}.pcapng", unique_name(what)))
}

/// `lb capture ARGS` as a child of its own.
fn capture_cmd(dir: &AgentDir, args: &[&str]) -> anyhow::Result<Command> {
    let mut cmd = Command::new(lb_binary()?);
    cmd.arg("--socket")
        .arg(dir.socket())
        .arg("capture")
        .args(args);
    Ok(cmd)
}

/// The agent's capture status (`GET /v1/capture`).
fn status(dir: &AgentDir) -> anyhow::Result<CaptureStatus> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = lb_userspace::api::client::Client::new(&dir.socket());
    Ok(rt.block_on(client.get::<CaptureStatus>("/v1/capture"))?)
}

/// Waits until the agent says a capture runs (or `running` is false: until none does).
fn wait_running(dir: &AgentDir, running: bool, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if status(dir)?.running == running {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("the capture was not running={running} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `lb capture` in the background while `traffic` runs; returns its output.
pub(crate) fn capture_during(
    net: &AgentDir,
    args: &[&str],
    traffic: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Output> {
    let mut child = capture_cmd(net, args)?
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning lb capture")?;
    // Until the agent says it runs; a capture that ended first says why.
    let start = Instant::now();
    while !status(net)?.running {
        if let Some(st) = child.try_wait()? {
            let out = child.wait_with_output()?;
            bail!(
                "lb capture exited ({st}) before it ran: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ensure!(
            start.elapsed() < Duration::from_secs(15),
            "the capture did not start within 15 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let waiter = std::thread::spawn(move || child.wait_with_output());
    traffic()?;
    let out = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("the capture's waiter panicked"))??;
    ensure!(
        out.status.success(),
        "lb capture failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// One packet as tshark decodes it.
#[derive(Debug, Default, Clone)]
pub(crate) struct Pkt {
    left: bool,
    eth_dst: String,
    ip_src: String,
    pub(crate) ip_dst: String,
    sport: u16,
    syn: bool,
    ack: bool,
    pub(crate) comment: BTreeMap<String, String>,
}

const FIELDS: [&str; 9] = [
    "frame.interface_id",
    "eth.dst",
    "ip.src",
    "ip.dst",
    "tcp.srcport",
    "tcp.flags.syn",
    "tcp.flags.ack",
    "frame.comment",
    "frame.len",
];

/// `fields` of each packet of a pcapng file, as `tshark` reads them (a field a packet has
/// twice, such as an encapsulated packet's addresses, as `outer,inner`).
pub(crate) fn tshark_fields(file: &Path, fields: &[&str]) -> anyhow::Result<Vec<Vec<String>>> {
    let mut args = vec![
        "-r".to_string(),
        file.display().to_string(),
        "-T".into(),
        "fields".into(),
        "-E".into(),
        "separator=|".into(),
    ];
    for f in fields {
        args.extend(["-e".to_string(), f.to_string()]);
    }
    let out = Command::new("tshark")
        .args(&args)
        .output()
        .context("running tshark")?;
    ensure!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut rows = Vec::new();
    for line in text.lines() {
        let f: Vec<String> = line.split('|').map(str::to_string).collect();
        ensure!(f.len() == fields.len(), "tshark line {line:?}");
        rows.push(f);
    }
    Ok(rows)
}

/// A packet comment's `key=value` words.
pub(crate) fn comment_of(c: &str) -> BTreeMap<String, String> {
    c.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The packets of a pcapng file, as `tshark` reads them.
pub(crate) fn tshark(file: &Path) -> anyhow::Result<Vec<Pkt>> {
    let mut pkts = Vec::new();
    for f in tshark_fields(file, &FIELDS)? {
        // Outer and inner headers (IPIP, GUE) list both addresses: the first is the outer.
        let first = |s: &str| s.split(',').next().unwrap_or("").to_string();
        pkts.push(Pkt {
            left: f[0] == "1",
            eth_dst: f[1].clone(),
            ip_src: first(&f[2]),
            ip_dst: first(&f[3]),
            sport: first(&f[4]).parse().unwrap_or(0),
            syn: f[5] == "1" || f[5] == "True",
            ack: f[6] == "1" || f[6] == "True",
            comment: comment_of(&f[7]),
        });
    }
    Ok(pkts)
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// 100 packets of the VIP while the client makes requests: tshark shows the client's SYNs to
/// the VIP, every one forwarded to the backend `lb trace` names for its flow, and with
/// `--both` the frame as it left with that backend's MAC; the file is the caller's, 0600.
#[test]
fn syns_to_the_vip_as_they_arrived_and_left_l2() -> anyhow::Result<()> {
    let net = serving(3)?;
    let file = out_file(&net.dir, "l2");
    let file_s = file.display().to_string();
    let vip = tcp_vip();
    let args = [
        "-w",
        &file_s,
        "--vip",
        &vip,
        "-c",
        "100",
        "--both",
        "--duration",
        "30s",
    ];
    let out = capture_during(&net.dir, &args, || {
        // Each request is at least five packets to the VIP: 40 are more than the capture keeps.
        for _ in 0..40 {
            net.http_get(vip_ip(), PORT)?;
        }
        Ok(())
    })?;
    let said = String::from_utf8_lossy(&out.stderr);
    eprintln!("{said}");
    ensure!(said.contains("100 packets captured"), "{said}");
    ensure!(said.contains("ended by count"), "{said}");
    let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the capture file's mode");

    let pkts = tshark(&file)?;
    let arrived: Vec<&Pkt> = pkts.iter().filter(|p| !p.left).collect();
    let left: Vec<&Pkt> = pkts.iter().filter(|p| p.left).collect();
    assert_eq!(arrived.len(), 100, "packets as they arrived");
    assert_eq!(
        left.len(),
        100,
        "every one was forwarded, so each left once"
    );
    let macs: BTreeMap<String, String> = (0..3)
        .map(|i| Ok((backend_ip(i), mac_str(net.backends[i].mac("eth0")?))))
        .collect::<anyhow::Result<_>>()?;
    // Each CPU's records come in order: a packet as it arrived, then as it left.
    let mut by_cpu: BTreeMap<String, Vec<&Pkt>> = BTreeMap::new();
    for p in &pkts {
        by_cpu.entry(p.comment["cpu"].clone()).or_default().push(p);
    }
    let pairs: Vec<(&Pkt, &Pkt)> = by_cpu
        .values()
        .flat_map(|v| v.chunks(2).map(|c| (c[0], c[1])))
        .collect();
    let mut syns = 0;
    for (a, l) in pairs {
        assert!(!a.left && l.left, "arrived then left: {a:?} {l:?}");
        assert_eq!((a.ip_src.as_str(), a.ip_dst.as_str()), (CLIENT_IP, VIP));
        assert_eq!(a.comment["verdict"], "forwarded", "{a:?}");
        assert_eq!(a.comment["vip"], vip, "{a:?}");
        let backend = &a.comment["backend"];
        assert_eq!(
            &l.eth_dst, &macs[backend],
            "the frame left for the backend's MAC"
        );
        // L2 DSR rewrites MACs only.
        assert_eq!(
            (l.ip_src.as_str(), l.ip_dst.as_str(), l.sport),
            (CLIENT_IP, VIP, a.sport)
        );
        if a.syn && !a.ack {
            syns += 1;
            let trace = net.lb(&["trace", "--json", &format!("{CLIENT_IP}:{}", a.sport), &vip])?;
            let t: serde_json::Value = serde_json::from_str(&trace)?;
            assert_eq!(
                t["next_packet_to"].as_str(),
                Some(backend.as_str()),
                "lb trace and the capture agree for port {}",
                a.sport
            );
        }
    }
    assert!(syns >= 15, "the client's SYNs: {syns}");
    // tcpdump reads the same file.
    let td = Command::new("tcpdump")
        .args(["-nr", &file_s])
        .output()
        .context("running tcpdump")?;
    ensure!(
        td.status.success(),
        "{}",
        String::from_utf8_lossy(&td.stderr)
    );
    let lines = String::from_utf8_lossy(&td.stdout);
    assert_eq!(lines.lines().count(), 200, "{lines}");
    assert!(
        lines.contains(&format!("> {VIP}.{PORT}: Flags [S]")),
        "{lines}"
    );
    Ok(())
}

/// `--verdict dropped --reason dropped_malformed` while a raw socket sends 100 malformed
/// frames among valid requests: exactly those frames are captured, byte for byte, and the
/// pcapng goes through a pipe (`-w -`) into `tcpdump -r -`.
#[test]
fn exactly_the_malformed_frames_through_a_pipe() -> anyhow::Result<()> {
    use lb_tests::{
        frames::{Frames, v4},
        raw::RawSocket,
    };
    let net = serving(2)?;
    let frames = Frames::new(net.client.mac("eth0")?, net.lb.mac("eth0")?);
    // A TCP header cut short: dropped as malformed (ports from the frame's number).
    let malformed: Vec<Vec<u8>> = (0..100u16)
        .map(|i| {
            let mut f = frames.tcp4((v4(CLIENT_IP), 41000 + i), (v4(VIP), PORT), "S", b"");
            f.truncate(14 + 20 + 8);
            f
        })
        .collect();
    let sent = malformed.clone();
    let out = capture_during(
        &net.dir,
        &[
            "-w",
            "-",
            "--verdict",
            "dropped",
            "--reason",
            "dropped_malformed",
            "--duration",
            "4s",
        ],
        || {
            let sock = net.client.run(|| RawSocket::bind("eth0"))??;
            for (i, f) in sent.iter().enumerate() {
                sock.send_waiting(f)?;
                if i % 10 == 0 {
                    net.http_get(vip_ip(), PORT)?;
                }
            }
            Ok(())
        },
    )?;
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let file = out_file(&net.dir, "malformed");
    std::fs::write(&file, &out.stdout)?;
    let pkts = tshark(&file)?;
    assert_eq!(pkts.len(), 100, "exactly the malformed frames");
    for p in &pkts {
        assert_eq!(p.comment["verdict"], "dropped");
        assert_eq!(p.comment["reason"], "dropped_malformed");
        assert!(!p.left);
    }
    // Byte for byte: tcpdump's hex of each frame is one of those sent, in order.
    let mut td = Command::new("tcpdump")
        .args(["-nr", "-", "-xx"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    td.stdin.take().context("stdin")?.write_all(&out.stdout)?;
    let td = td.wait_with_output()?;
    ensure!(
        td.status.success(),
        "{}",
        String::from_utf8_lossy(&td.stderr)
    );
    let dumped = hex_frames(&String::from_utf8_lossy(&td.stdout));
    assert_eq!(dumped, malformed, "the captured bytes are the sent frames");
    Ok(())
}

/// Frames from `tcpdump -xx`'s hex lines.
fn hex_frames(text: &str) -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("0x")
            && line.starts_with('\t')
        {
            let hex = rest.split_once(':').map_or("", |(_, h)| h);
            let last = frames
                .last_mut()
                .expect("a frame's first line before its hex");
            for word in hex.split_whitespace() {
                for i in (0..word.len()).step_by(2) {
                    last.push(u8::from_str_radix(&word[i..i + 2], 16).expect("hex"));
                }
            }
        } else {
            frames.push(Vec::new());
        }
    }
    frames
}

/// The client killed mid-capture: the agent ends the capture within a second, the program
/// stops emitting (its counter stays put under traffic), and a new capture may start.
#[test]
fn a_killed_client_ends_the_capture() -> anyhow::Result<()> {
    let net = serving(1)?;
    let file = out_file(&net.dir, "killed");
    let file_s = file.display().to_string();
    let mut cmd = capture_cmd(&net.dir, &["-w", &file_s, "--duration", "60s"])?;
    cmd.stderr(Stdio::null());
    let mut child = ChildGuard::spawn(cmd, "lb capture")?;
    wait_running(&net.dir, true, Duration::from_secs(15))?;
    for _ in 0..5 {
        net.http_get(vip_ip(), PORT)?;
    }
    let during = status(&net.dir)?.counts.emitted;
    assert!(during > 0, "the program emitted nothing while capturing");
    // One capture at a time: a second is refused with one line, exit 4 (conflict), and
    // leaves no file.
    let second = out_file(&net.dir, "second");
    let refused =
        capture_cmd(&net.dir, &["-w", &second.display().to_string(), "-c", "1"])?.output()?;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(4), "{said}");
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(said.contains("another capture is running"), "{said}");
    assert!(!second.exists(), "a refused capture made its file");
    child.kill();
    let took = wait_running(&net.dir, false, Duration::from_secs(1))?;
    eprintln!("the capture ended {took:?} after the client was killed");
    let after = status(&net.dir)?.counts.emitted;
    for _ in 0..10 {
        net.http_get(vip_ip(), PORT)?;
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        status(&net.dir)?.counts.emitted,
        after,
        "the program went on emitting after the capture ended"
    );
    // The one capture's claim is free again. Its file exists already, readable by others:
    // it is made the caller's alone again.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let out = capture_during(&net.dir, &["-w", &file_s, "-c", "3"], || {
        for _ in 0..3 {
            net.http_get(vip_ip(), PORT)?;
        }
        Ok(())
    })?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 packets captured"));
    let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "an existing file's mode");
    // The last capture's counts stay visible in `lb stats` (the same view feeds /metrics and
    // the status page) until the next one starts.
    let c = net.dir.stats()?.capture.context("no capture in lb stats")?;
    assert!(!c.running && c.counts.emitted >= 3, "{c:?}");
    // What --sample leaves out is counted apart: at one in a million, all of it.
    capture_during(
        &net.dir,
        &["-w", &file_s, "--sample", "1/1000000", "--duration", "2s"],
        || {
            for _ in 0..5 {
                net.http_get(vip_ip(), PORT)?;
            }
            Ok(())
        },
    )?;
    let c = net.dir.stats()?.capture.context("no capture in lb stats")?;
    assert!(c.counts.sampled_out >= 5, "{c:?}");
    let text = net.dir.cli_ok(&["stats"])?;
    let line = format!(
        "capture: none running (the last one's counts), {} records, {} missed, {} sampled out",
        c.counts.emitted, c.counts.missed, c.counts.sampled_out
    );
    assert!(text.contains(&line), "{text}");
    Ok(())
}
