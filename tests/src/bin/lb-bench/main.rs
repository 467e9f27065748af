//! `cargo xtask bench`: data-plane cost per packet from BPF_PROG_TEST_RUN on freshly loaded
//! programs, and control-plane timings. Everything is measured in this one process and run,
//! and each packet figure is printed with its ratio to the XDP_PASS floor measured alongside.
use std::time::Instant;

use anyhow::Context as _;
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_tests::{
    AgentDir, Netns, VethPair,
    world::{SCENE, xdp_md},
};
use lb_userspace::maglev::{self, MaglevBackend};

mod encap;
mod fleet;
mod guard;
mod insns;
mod nat;
mod nat_rate;
mod newflow;
mod packet;
mod second_chance;

use encap::{encap_rows, stateless_rows};
use fleet::fleet_rows;
use insns::{insn_rows, verified_rows};
use nat::nat_rows;
use packet::packet_rows;
use second_chance::second_chance_rows;

const REPEAT: u32 = 1_000_000;
const NEW_FLOWS: u32 = 200_000;

/// An established-flow segment (ACK, 64 bytes of payload) from the router to the LB.
fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    SCENE.tcp4((src, sport), (dst, dport), "A", &[0u8; 64])
}

/// One BPF_PROG_TEST_RUN of `repeat` passes over `frame`, received on interface `ingress`
/// of the calling thread's namespace (loopback when `None`): the mean ns per pass, as the
/// kernel timed the passes.
///
/// The kernel reports that mean in whole nanoseconds (`time_spent / repeat`, integer
/// division), which loses 0-1 ns, half a nanosecond on average: on a host whose XDP_PASS
/// floor is 6 ns that loss is a twelfth of the floor, so a run of many passes adds it back.
/// (The wall clock around the syscall is no substitute: a run of more than one pass swaps
/// the program into the XDP dispatcher and out again, and those two updates wait for RCU
/// grace periods, whole scheduler ticks: 24 ms of wall time for 9.5 ms of passes here.) A
/// single run's figure is its one pass's whole time, kept as it is.
fn test_run(prog: &Xdp, frame: &[u8], repeat: u32, ingress: Option<u32>) -> anyhow::Result<f64> {
    let mut out = vec![0u8; frame.len() + 256];
    let ctx = ingress.map(|i| xdp_md(frame.len(), i));
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx.as_deref(),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    let ns = r.duration.as_nanos() as f64;
    Ok(if repeat > 1 { ns + 0.5 } else { ns })
}

/// Median of three runs of `repeat` passes (mean ns per pass, as `test_run` times it), each
/// run on the frame `frame(run)` gives, received on `ingress`.
fn median_of_three(
    prog: &Xdp,
    repeat: u32,
    ingress: Option<u32>,
    frame: impl Fn(u8) -> Vec<u8>,
) -> anyhow::Result<f64> {
    let mut runs = Vec::new();
    for run in 0..3u8 {
        runs.push(test_run(prog, &frame(run), repeat, ingress)?);
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[1])
}

/// Mean ns per pass of `repeat` passes over `frame`; median of three runs.
fn ns_repeat(prog: &Xdp, frame: &[u8], repeat: u32) -> anyhow::Result<f64> {
    median_of_three(prog, repeat, None, |_| frame.to_vec())
}

/// Mean ns per pass of the new-flow harness: each run starts from its own client range so
/// that no pass meets a flow placed before.
fn ns_new_flows(prog: &Xdp, repeat: u32) -> anyhow::Result<f64> {
    median_of_three(prog, repeat, None, |run| {
        tcp([100, 64 + run, 0, 0], 1, [10, 0, 0, 10], 80)
    })
}

/// Mean kernel-reported ns of `n` single runs, each on the frame `make(i)` gives, received
/// on `ingress`.
fn ns_single(
    prog: &Xdp,
    n: u32,
    ingress: Option<u32>,
    make: impl Fn(u32) -> Vec<u8>,
) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for i in 0..n {
        total += test_run(prog, &make(i), 1, ingress)?;
    }
    Ok(total / f64::from(n))
}

/// A distinct client for single-run flow `i`: 100.100.x.y:port (apart from the harness range).
fn client(i: u32) -> ([u8; 4], u16) {
    let host = i / 50_000;
    (
        [100, 100, (host >> 8) as u8, host as u8],
        10_000 + (i % 50_000) as u16,
    )
}

struct Row {
    name: String,
    ns: f64,
    floor: f64,
    /// The ratio to print when it was not `ns / floor` (a median of paired rounds).
    ratio: Option<f64>,
    target: Option<f64>,
}

fn row(name: String, ns: f64, floor: f64, target: Option<f64>) -> Row {
    Row {
        name,
        ns,
        floor,
        ratio: None,
        target,
    }
}

fn print_rows(rows: &[Row]) {
    println!("| case | ns/packet | x floor | target |");
    println!("| --- | ---: | ---: | --- |");
    for r in rows {
        let ratio = r.ratio.unwrap_or(r.ns / r.floor);
        let target = match r.target {
            Some(t) => format!("<= {t}x {}", if ratio <= t { "met" } else { "MISSED" }),
            None => "-".into(),
        };
        println!("| {} | {:.1} | {:.2} | {} |", r.name, r.ns, ratio, target);
    }
}

fn maglev_rows() {
    println!("| Maglev build, M = 65537 | median ms (of 9) |");
    println!("| --- | ---: |");
    for n in [10u32, 100, 1000] {
        let backends: Vec<MaglevBackend> = (1..=n)
            .map(|i| MaglevBackend {
                id: i,
                key: format!("10.2.{}.{}:80", i / 250, i % 250),
                weight: 1 + i % 3,
            })
            .collect();
        let mut times: Vec<f64> = (0..9)
            .map(|_| {
                let t = Instant::now();
                let table = maglev::build(&backends, 65537);
                let e = t.elapsed().as_secs_f64() * 1e3;
                assert_eq!(table.len(), 65537);
                e
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!("| {n} backends | {:.3} |", times[4]);
    }
}

/// Address and MAC of bench backend `i`.
fn bench_backend(i: u32) -> (String, String) {
    (
        format!("10.66.{}.{}", i / 250 + 1, i % 250 + 1),
        format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256),
    )
}

/// A config with one VIP and backends 10.66.x.y (1..=n), each with a MAC when `macs`.
fn config_with(n: u32, macs: bool) -> String {
    let mut s = String::from("[[vip]]\naddress = \"10.66.0.100:80/tcp\"\nbackend = [\n");
    for i in 1..=n {
        let (addr, mac) = bench_backend(i);
        if macs {
            s.push_str(&format!("  {{ address = \"{addr}\", mac = \"{mac}\" }},\n"));
        } else {
            s.push_str(&format!("  {{ address = \"{addr}\" }},\n"));
        }
    }
    s.push_str("]\n");
    s
}

/// Runs `lb backend add` for bench backend `i`; returns the CLI call's ms.
fn add_one(dir: &AgentDir, i: u32, with_mac: bool) -> anyhow::Result<f64> {
    let (addr, mac) = bench_backend(i);
    let mut args = vec!["backend", "add", "10.66.0.100:80/tcp", addr.as_str()];
    if with_mac {
        args.extend(["--mac", mac.as_str()]);
    }
    let t = Instant::now();
    let out = dir.cli_ok(&args)?;
    let wall = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        !out.contains("no MAC"),
        "backend {addr} was not resolved: {out}"
    );
    Ok(wall)
}

/// Time from an API call to the new table being live (the agent answers after the kernel
/// maps are written), measured in the agent and around the whole CLI call.
fn control_plane_rows() -> anyhow::Result<()> {
    let lb = Netns::new("bnl")?;
    let peer = Netns::new("bnp")?;
    let veth = VethPair::new(&lb, "10.66.0.1/24", &peer, "10.66.0.2/24")?;
    let dir = AgentDir::new("bn")?;
    let _agent = dir.spawn_agent(&lb, &veth.a, &[])?;
    println!("| API change, M = 65537 | in agent ms | CLI call ms |");
    println!("| --- | ---: | ---: |");
    let file = dir.dir.join("bench.toml");
    for (label, n) in [
        ("new VIP, 10 backends (full table)", 10),
        ("add 1 backend to 10", 11),
        ("grow to 100 backends", 100),
        ("add 1 backend to 100", 101),
        ("grow to 1000 backends", 1000),
        ("add 1 backend to 1000", 1001),
        ("add 1 more (diff against the table two changes back)", 1002),
    ] {
        std::fs::write(&file, config_with(n, true))?;
        let t = Instant::now();
        let out = dir.cli_ok(&["apply", "-f", &file.to_string_lossy(), "--json"])?;
        let wall = t.elapsed().as_secs_f64() * 1e3;
        let r: serde_json::Value = serde_json::from_str(&out)?;
        let took = r["took_ns"].as_f64().unwrap_or(f64::NAN) / 1e6;
        println!("| {label} | {took:.2} | {wall:.2} |");
    }
    // The 1000th backend without --mac: its MAC comes from the neighbour table (1000
    // permanent entries on the interface, as a warm ARP cache would hold), next to the same
    // call with --mac in the same run.
    let mut batch = String::new();
    for i in 1..=1000 {
        let (addr, mac) = bench_backend(i);
        batch.push_str(&format!(
            "neigh replace {addr} lladdr {mac} dev {} nud permanent\n",
            veth.a
        ));
    }
    let batch_file = dir.dir.join("neigh.batch");
    std::fs::write(&batch_file, batch)?;
    lb_tests::net::sh(
        "ip",
        &["-n", lb.name(), "-batch", &batch_file.to_string_lossy()],
    )?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for _ in 0..3 {
        for (macs, out) in [(true, &mut with), (false, &mut without)] {
            std::fs::write(&file, config_with(999, macs))?;
            dir.cli_ok(&["apply", "-f", &file.to_string_lossy()])?;
            out.push(add_one(&dir, 1000, macs)?);
        }
    }
    with.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    println!(
        "| add the 1000th backend with --mac (`lb backend add`, median of 3) | - | {:.2} |",
        with[1]
    );
    println!(
        "| add the 1000th backend without --mac, MAC from the neighbour table (median of 3) | - | {:.2} |",
        without[1]
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // The harness programs (`bench_*`) are only in the benchmark objects.
    lb_tests::world::use_bench_objects();
    println!("## Data plane (BPF_PROG_TEST_RUN, freshly loaded program, one process)\n");
    // BENCH_ONLY=encap: just the encapsulation rows (quick iteration on that path).
    match std::env::var("BENCH_ONLY").as_deref() {
        Ok("encap") => {
            print_rows(&encap_rows()?);
            return Ok(());
        }
        Ok("stateless") => {
            print_rows(&stateless_rows()?);
            return Ok(());
        }
        Ok("second_chance") => {
            print_rows(&second_chance_rows()?);
            return Ok(());
        }
        Ok("packet") => {
            // The shared table's rows with the floors, as in the full run.
            print_rows(&packet_rows(false, true)?);
            return Ok(());
        }
        Ok("cache") => {
            print_rows(&packet::cache_rows()?);
            return Ok(());
        }
        Ok("newflow") => {
            print_rows(&newflow::new_flow_stage_rows()?);
            return Ok(());
        }
        Ok("insns") => {
            insn_rows()?;
            println!();
            return verified_rows();
        }
        Ok("verified") => return verified_rows(),
        Ok("spin") => return packet::spin(),
        Ok("fleet") => return fleet_rows(),
        Ok("nat") => {
            print_rows(&nat_rows()?);
            println!();
            return nat_rate::nat_rate_rows();
        }
        Ok("nat_rate") => return nat_rate::nat_rate_rows(),
        Ok("guard") => return guard::guard_rows(),
        _ => {}
    }
    let mut rows = packet_rows(false, true)?;
    rows.extend(packet_rows(true, false)?);
    rows.extend(packet::cache_rows()?);
    rows.extend(newflow::new_flow_stage_rows()?);
    rows.extend(stateless_rows()?);
    rows.extend(encap_rows()?);
    rows.extend(second_chance_rows()?);
    rows.extend(nat_rows()?);
    print_rows(&rows);
    println!();
    nat_rate::nat_rate_rows()?;
    println!();
    guard::guard_rows()?;
    println!();
    insn_rows()?;
    println!();
    verified_rows()?;
    println!();
    println!("New flows need a distinct flow per pass. The harness rows run a program that calls");
    println!("the load balancer and then moves the frame to the next client, so each of the");
    println!("{REPEAT} passes places a new flow (the harness alone is shown). The single-run rows");
    println!("send {NEW_FLOWS} distinct frames, one syscall each, against the floor measured the");
    println!("same way; cold caches on every run dominate them.\n");
    maglev_rows();
    println!();
    control_plane_rows()?;
    println!();
    fleet_rows()?;
    Ok(())
}
