//! Second chance on real parts: a routed network, the load balancer with the flow table off
//! (every packet placed by the live table), `lb decap` (XDP) on three backends with two
//! addresses each, and 50 keep-alive connections exchanging a request every 100 ms while 100
//! random backend operations (add, remove, drain, undrain, reweight) run. With second chance
//! no connection breaks and every answer comes from the backend that answered first; the
//! control run (second chance off) shows what it prevents. The connections talk for a while
//! before the changes start, as connections do: each slot's previous backend is the recent
//! owner that held it longest (`agent::second_chance`), so a burst of changes shorter than that keeps
//! them all.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    bgp::wait_hops,
    fleet::{Bgp, node_addr},
    routed::{Routed, VIP4, backend_dev},
    traffic::{connect_many, request},
};

const CONNS: usize = 50;
const OPS: usize = 100;
/// Connections of the restart test.
const CONNS_RESTART: usize = 40;
/// Traffic before the changes start; the 100 changes take about 6 s.
const STEADY: Duration = Duration::from_secs(8);

/// Backend addresses: `.2` (the network's) and `.3` (added here) on each of the 3 hosts.
fn pool() -> Vec<String> {
    let mut p = Vec::new();
    for i in 1..=3 {
        p.push(format!("10.4{i}.0.2"));
        p.push(format!("10.4{i}.0.3"));
    }
    p
}

/// What the connections saw.
#[derive(Debug, Default)]
struct Outcome {
    requests: u64,
    broken: u64,
    other_backend: u64,
}

/// A deterministic generator (xorshift): the same operations every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The VIP's backends as the test keeps them: address and drained.
struct Members(Vec<(String, bool)>);

impl Members {
    fn serving(&self) -> usize {
        self.0.iter().filter(|(_, d)| !d).count()
    }
}

/// One random valid operation, as `lb` arguments.
fn next_op(rng: &mut Rng, m: &mut Members, vip: &str) -> Vec<String> {
    let s = |x: &str| x.to_string();
    loop {
        match rng.below(5) {
            0 => {
                let free: Vec<String> = pool()
                    .into_iter()
                    .filter(|a| !m.0.iter().any(|(b, _)| b == a))
                    .collect();
                if free.is_empty() {
                    continue;
                }
                let a = free[rng.below(free.len())].clone();
                m.0.push((a.clone(), false));
                return vec![s("backend"), s("add"), s(vip), a];
            }
            1 => {
                let i = rng.below(m.0.len());
                if m.0.len() < 2 || (!m.0[i].1 && m.serving() < 2) {
                    continue;
                }
                let (a, _) = m.0.remove(i);
                return vec![s("backend"), s("remove"), s(vip), a];
            }
            2 => {
                let i = rng.below(m.0.len());
                if m.0[i].1 || m.serving() < 2 {
                    continue;
                }
                m.0[i].1 = true;
                return vec![s("backend"), s("drain"), s(vip), m.0[i].0.clone()];
            }
            3 => {
                let i = rng.below(m.0.len());
                if !m.0[i].1 {
                    continue;
                }
                m.0[i].1 = false;
                let a = m.0[i].0.clone();
                return vec![s("backend"), s("drain"), s(vip), a, s("--undo")];
            }
            _ => {
                let i = rng.below(m.0.len());
                let w = 50 + rng.below(151);
                let a = m.0[i].0.clone();
                return vec![s("backend"), s("weight"), s(vip), a, w.to_string()];
            }
        }
    }
}

/// `lb args` on every load balancer node, in turn (as a fleet's operators, or its config
/// store, would).
fn on_all(net: &Routed, args: &[&str]) -> anyhow::Result<()> {
    for k in 0..net.nodes() {
        net.lb_at(k, args)?;
    }
    Ok(())
}

/// Sends the VIP's traffic through load balancer nodes `nodes` only, as an operator would:
/// the others drained (withdrawn at once, no drain time), these undrained first so the route
/// never goes empty; waits until the router's ECMP route, learned over BGP, has exactly them.
fn steer(net: &Routed, nodes: &[usize]) -> anyhow::Result<()> {
    for k in nodes {
        net.lb_at(*k, &["node", "undrain"])?;
    }
    for k in (0..net.nodes()).filter(|k| !nodes.contains(k)) {
        net.lb_at(k, &["node", "drain", "--withdraw-after", "0"])?;
    }
    let mut want: Vec<String> = nodes.iter().map(|k| node_addr(*k)).collect();
    want.sort();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    wait_hops(
        &net.router,
        &format!("{VIP4}/32"),
        &want,
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// Opens the connections, runs the operations under load (every 10th one also moves flows
/// between load balancer nodes when `reshuffle`), and reports.
fn run(net: &Routed, second_chance: &str, reshuffle: bool) -> anyhow::Result<Outcome> {
    let vip = format!("{VIP4}:80/tcp");
    on_all(
        net,
        &[
            "vip",
            "add",
            &vip,
            "--forward",
            "gue",
            "--second-chance",
            second_chance,
        ],
    )?;
    let mut members = Members(Vec::new());
    for i in 1..=3 {
        let a = format!("10.4{i}.0.2");
        on_all(net, &["backend", "add", &vip, &a])?;
        members.0.push((a, false));
    }
    if reshuffle {
        // Announced by every node (the VIP serves) before the first connection.
        steer(net, &[0, 1, 2])?;
    }
    let target = SocketAddr::new(VIP4.parse()?, 80);
    let mut conns = connect_many(&net.client, target, CONNS)?;
    let ports: Vec<u16> = conns
        .iter()
        .map(|c| c.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    // Who answers each connection before any change.
    let mut owners = Vec::new();
    for c in &mut conns {
        owners.push(request(c)?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let broken = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for ((mut c, owner), port) in conns.into_iter().zip(owners).zip(ports.clone()) {
        let (stop, requests, broken, other) = (
            stop.clone(),
            requests.clone(),
            broken.clone(),
            other.clone(),
        );
        workers.push(std::thread::spawn(
            move || -> Option<(u16, String, String)> {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match request(&mut c) {
                        Ok(b) => {
                            requests.fetch_add(1, Ordering::Relaxed);
                            if b != owner {
                                other.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            broken.fetch_add(1, Ordering::Relaxed);
                            return Some((port, owner, e.to_string()));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                None
            },
        ));
    }
    // Steady traffic first: the owners hold their slots longer than the burst of changes
    // below lasts (the rule that picks each slot's previous backend: `agent::second_chance`).
    std::thread::sleep(STEADY);
    let mut rng = Rng(0x005e_c02d_c4a2_ce42);
    let deadline = Instant::now() + Duration::from_secs(90);
    // Node sets the router's route cycles through: flows move between nodes each time.
    let groups: [&[usize]; 4] = [&[1, 2], &[0, 2], &[2, 1, 0], &[0, 1]];
    for n in 0..OPS {
        anyhow::ensure!(Instant::now() < deadline, "operations took too long");
        let op = next_op(&mut rng, &mut members, &vip);
        let args: Vec<&str> = op.iter().map(String::as_str).collect();
        on_all(net, &args)?;
        if reshuffle && n % 10 == 5 {
            steer(net, groups[(n / 10) % groups.len()])?;
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    // The connections keep talking a while after the last change.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let lost: Vec<(u16, String, String)> = workers
        .into_iter()
        .filter_map(|w| w.join().ok().flatten())
        .collect();
    // What a broken connection's slot carries now, for the reader of a failure.
    for (port, owner, e) in &lost {
        let t = net.lb(&["trace", &format!("10.20.0.2:{port}"), &vip])?;
        println!("broken: port {port} ({owner}): {e}\n{t}");
    }
    if second_chance != "0" {
        // The operator's view: previous slots per backend (retired ones too), the window,
        // and both hops of a connection whose slot moved.
        let list = net.lb(&["backend", "list", &vip])?;
        anyhow::ensure!(
            list.contains("PREV SLOTS")
                && list.contains("second chance carries previous backends for"),
            "{list}"
        );
        let mut two_hops = 0;
        for p in &ports {
            let t = net.lb(&["trace", &format!("10.20.0.2:{p}"), &vip, "--json"])?;
            let t: serde_json::Value = serde_json::from_str(&t)?;
            if t["previous_backends"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            {
                two_hops += 1;
            }
        }
        anyhow::ensure!(
            two_hops > 0,
            "no connection's slot names a previous backend"
        );
        println!("{two_hops} of {CONNS} connections have a slot that carries a previous backend");
    }
    let out = Outcome {
        requests: requests.load(Ordering::Relaxed),
        broken: broken.load(Ordering::Relaxed),
        other_backend: other.load(Ordering::Relaxed),
    };
    on_all(net, &["vip", "remove", &vip])?;
    Ok(out)
}

/// Every backend host gets its second address, a sample server and `lb decap` (XDP); the
/// router runs XDP on its ends so the backends' XDP_TX is delivered.
fn backends_with_decap(net: &mut Routed) -> anyhow::Result<()> {
    for i in 1..=3 {
        net.backends[i - 1].ip(&[
            "addr",
            "add",
            &format!("10.4{i}.0.3/24"),
            "dev",
            &backend_dev(i),
        ])?;
        net.start_sample(i)?;
        net.decap(i, &[])?;
    }
    net.xdp_pass_to_backends()?;
    Ok(())
}

#[test]
fn connections_survive_100_backend_changes_with_the_flow_table_off() -> anyhow::Result<()> {
    let mut net = Routed::new("sch")?;
    backends_with_decap(&mut net)?;
    net.start_agent(&["--flow-table", "off"])?;
    let with = run(&net, "120", false)?;
    let stats: Vec<String> = (1..=3)
        .map(|i| net.decap(i, &["--stats", "--json"]).unwrap_or_default())
        .collect();
    let total = |reason: &str| -> u64 {
        stats
            .iter()
            .filter_map(|s| serde_json::from_str::<serde_json::Value>(s).ok())
            .map(|v| v[reason]["packets"].as_u64().unwrap_or(0))
            .sum()
    };
    let (forwarded, last_hop) = (total("forwarded"), total("kept_last_hop"));
    let control = run(&net, "0", false)?;
    println!(
        "second chance on:  {} requests, {} broken connections, {} answers from another backend",
        with.requests, with.broken, with.other_backend
    );
    println!(
        "second chance off: {} requests, {} broken connections, {} answers from another backend",
        control.requests, control.broken, control.other_backend
    );
    assert_eq!(
        (with.broken, with.other_backend),
        (0, 0),
        "second chance kept every connection on its backend\n{}",
        stats.join("\n")
    );
    assert!(
        with.requests > (CONNS * 10) as u64,
        "the connections kept talking: {with:?}"
    );
    // The backends sent packets on to the previous backend, and the previous backends kept
    // them as the last hop.
    assert!(
        forwarded > 0 && last_hop > 0,
        "forwarded {forwarded}, kept as last hop {last_hop}\n{}",
        stats.join("\n")
    );
    println!(
        "backends: {forwarded} packets sent on to the previous backend, {last_hop} kept there"
    );
    assert!(
        control.broken > 0,
        "the control run breaks connections (otherwise this test proves nothing): {control:?}"
    );
    Ok(())
}

/// The same with three load balancer nodes behind ECMP (each stateless, each told every
/// change), announcing the VIP by BGP to the router; every 10 operations a different set of
/// nodes is drained, so the router's route changes and connections move between nodes
/// while their slots move between backends.
#[test]
fn connections_survive_changes_and_ecmp_reshuffles_across_three_nodes() -> anyhow::Result<()> {
    let mut net = Routed::fleet("scf", 3)?;
    backends_with_decap(&mut net)?;
    // Declared after the network: the speakers stop before its namespaces go.
    let bgp = Bgp::start(&net, "10.30.0.1", &[])?;
    for k in 0..3 {
        let mut args = vec!["--flow-table".to_string(), "off".into()];
        args.extend(bgp.agent_args(k));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        net.start_agent_at(k, &args)?;
    }
    let forwarded = |net: &Routed| -> anyhow::Result<Vec<u64>> {
        (0..3)
            .map(|k| {
                let s: serde_json::Value =
                    serde_json::from_str(&net.lb_at(k, &["stats", "--json"])?)?;
                Ok(s["global"]["forwarded"]["packets"].as_u64().unwrap_or(0))
            })
            .collect()
    };
    let before = forwarded(&net)?;
    let with = run(&net, "120", true)?;
    let after = forwarded(&net)?;
    println!(
        "3 nodes, ECMP reshuffled every 10 changes: {} requests, {} broken connections, {} answers from another backend; packets forwarded per node: {:?}",
        with.requests,
        with.broken,
        with.other_backend,
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>()
    );
    assert_eq!((with.broken, with.other_backend), (0, 0), "{with:?}");
    assert!(with.requests > (CONNS * 10) as u64, "{with:?}");
    for k in 0..3 {
        assert!(
            after[k] > before[k],
            "node {k} carried traffic: {before:?} -> {after:?}"
        );
    }
    Ok(())
}

/// Two changes within a window, the connections older than both: every connection starts on
/// X (the only backend), then A is added (half the slots go X -> A) and, after A has held its
/// slots longer than X held them before, B (a third of A's slots go A -> B). A slot that went
/// X -> A -> B carries A, then X: X's connections are kept by the second hop. With one
/// previous backend per slot such a slot carried A only and X's connections there broke
/// (what the fleet test once saw after a weight change).
#[test]
fn connections_older_than_two_changes_survive_them() -> anyhow::Result<()> {
    let mut net = Routed::new("sc2")?;
    backends_with_decap(&mut net)?;
    net.start_agent(&["--flow-table", "off"])?;
    let vip = gue_vip_with_second_chance(&net)?;
    net.lb(&["backend", "add", &vip, "10.41.0.2"])?;
    let target = SocketAddr::new(VIP4.parse()?, 80);
    let mut conns = connect_many(&net.client, target, 60)?;
    let owners: Vec<String> = conns.iter_mut().map(request).collect::<Result<_, _>>()?;
    anyhow::ensure!(
        owners.iter().all(|o| o == "hello from backend 1"),
        "{owners:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    net.lb(&["backend", "add", &vip, "10.42.0.2"])?;
    std::thread::sleep(Duration::from_secs(2));
    let round = |conns: &mut Vec<std::net::TcpStream>| {
        conns
            .iter_mut()
            .map(|c| request(c).ok())
            .filter(|answer| answer.as_deref() != Some("hello from backend 1"))
            .count()
    };
    assert_eq!(round(&mut conns), 0, "after the first change");
    net.lb(&["backend", "add", &vip, "10.43.0.2"])?;
    let broken = round(&mut conns);
    // The connections only the second hop keeps: their slot carries X second.
    let mut second = 0;
    for c in &conns {
        let from = c.local_addr()?;
        let t = net.lb(&["trace", &from.to_string(), &vip, "--json"])?;
        let t: serde_json::Value = serde_json::from_str(&t)?;
        if t["previous_backends"][1] == "10.41.0.2" {
            second += 1;
        }
    }
    println!(
        "60 connections on X, X -> A -> B: {broken} broken or answered by another backend; {second} kept by the second hop"
    );
    assert_eq!(broken, 0, "every connection stayed on X");
    assert!(
        second > 0,
        "no connection needed the second hop (otherwise this test proves nothing)"
    );
    Ok(())
}

/// A VIP set up with its backend replaced three times in a row (so the kernel's slots carry
/// three setup owners that held them for milliseconds as previous backends), 40 connections
/// that talk for a while, then the agent killed (kill -9) and started again, and the serving
/// backend replaced. With the history saved beside the state file the restarted agent knows
/// which owner served: every connection still reaches the backend it started on, through the
/// restart and the change after it. Control: the same with the history deleted before the
/// restart (the agent can only adopt what the kernel carries and takes the setup owners for
/// long-serving ones, so the slots have no place left for their real owner): connections
/// break.
#[test]
fn a_restarted_agent_resumes_the_previous_backends() -> anyhow::Result<()> {
    let mut net = Routed::new("scr")?;
    backends_with_decap(&mut net)?;
    net.start_agent(&["--flow-table", "off"])?;
    let kept = restart_under_changes(&mut net, true)?;
    let control = restart_under_changes(&mut net, false)?;
    println!(
        "{CONNS_RESTART} connections, restart, the serving backend replaced: {kept} broken with the saved history, {control} without it"
    );
    assert_eq!(kept, 0, "every connection kept its backend");
    assert!(
        control > 0,
        "without the history connections break (otherwise this test proves nothing)"
    );
    Ok(())
}

/// Adds the test VIP (`gue`, second chance for 120 s) on the single load balancer; its name.
fn gue_vip_with_second_chance(net: &Routed) -> anyhow::Result<String> {
    let vip = format!("{VIP4}:80/tcp");
    let window = ["--forward", "gue", "--second-chance", "120"];
    net.lb(&[&["vip", "add", vip.as_str()][..], &window].concat())?;
    Ok(vip)
}

/// One run of [`a_restarted_agent_resumes_the_previous_backends`]; returns how many
/// connections broke or were answered by another backend.
fn restart_under_changes(net: &mut Routed, keep_history: bool) -> anyhow::Result<usize> {
    let vip = gue_vip_with_second_chance(net)?;
    // Set up with three replacements in a row (a rollout): every slot ends up carrying the
    // three setup owners, which fill its previous backends when they count as "for ever"
    // owners (no history). They sit on hosts 1 and 3: a hop to the serving backend's host 2
    // (its other address) would find its sockets.
    let setup = ["10.41.0.2", "10.43.0.2", "10.41.0.3", "10.42.0.2"];
    net.lb(&["backend", "add", &vip, setup[0]])?;
    for pair in setup.windows(2) {
        net.lb(&["backend", "add", &vip, pair[1]])?;
        net.lb(&["backend", "remove", &vip, pair[0]])?;
    }
    let target = SocketAddr::new(VIP4.parse()?, 80);
    let mut conns = connect_many(&net.client, target, CONNS_RESTART)?;
    let owners: Vec<String> = conns.iter_mut().map(request).collect::<Result<_, _>>()?;
    // The owners serve for longer than the setup owners held their slots.
    std::thread::sleep(Duration::from_secs(1));
    // Previous slots per backend, retired ones (removed, still carried) included.
    let prev = |net: &Routed| -> anyhow::Result<Vec<usize>> {
        let v = net.dir.vips()?;
        let serving = v[0].backends.iter().map(|b| b.previous_slots);
        Ok(serving
            .chain(v[0].retired.iter().map(|r| r.previous_slots))
            .collect())
    };
    let before = prev(net)?;
    anyhow::ensure!(
        before.iter().sum::<usize>() > 0,
        "no slot carries a previous backend"
    );
    let mut agent = net.agent.take().context("agent")?;
    agent.kill();
    let history = net.dir.state_file().with_extension("second-chance");
    anyhow::ensure!(history.exists(), "{} was saved", history.display());
    if !keep_history {
        std::fs::remove_file(&history)?;
    }
    net.start_agent(&["--flow-table", "off"])?;
    let after = prev(net)?;
    println!(
        "history kept: {keep_history}; previous slots per backend before the restart {before:?}, after {after:?}"
    );
    assert_eq!(
        before, after,
        "the restarted agent kept every previous backend"
    );
    assert!(net.dir.vips()?[0].window_ends_in_s.is_some());
    // The serving backend replaced: every slot moves, to a backend no slot carries.
    net.lb(&["backend", "add", &vip, "10.43.0.3"])?;
    net.lb(&["backend", "remove", &vip, "10.42.0.2"])?;
    let broken = conns
        .iter_mut()
        .zip(&owners)
        .map(|(c, owner)| request(c).ok().as_ref() != Some(owner))
        .filter(|b| *b)
        .count();
    drop(conns);
    net.lb(&["vip", "remove", &vip])?;
    Ok(broken)
}
