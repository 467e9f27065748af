//! The flow-table rows: the load balancer's packet paths with a flow table (shared LRU or
//! per-CPU LRU lists), each with its ratio to the XDP_PASS floor.
//!
//! The rows with targets are measured in alternating rounds: floor, case, floor, case, ...
//! (`ROUNDS` of each), and their ratio is the median of the per-round ratios. This VM's floor
//! drifts by up to a third over a run, so a ratio of two figures taken seconds apart carried
//! that drift into the comparison with the target; a floor taken next to each case does not.
use aya::programs::Xdp;
use lb_tests::world::{SCENE, World, run_once};

use super::{NEW_FLOWS, REPEAT, Row, client, ns_repeat, ns_single, row, tcp, test_run};

/// The frames of the timed paths, to VIP `vip` (port 80).
struct Frames {
    /// A flow's packet (made established by sending it twice).
    established: Vec<u8>,
    /// The same client to an address that is no VIP.
    non_vip: Vec<u8>,
    /// Another client's SYN.
    syn: Vec<u8>,
}

impl Frames {
    fn new(vip: [u8; 4]) -> Self {
        Self {
            established: tcp([192, 0, 2, 7], 40000, vip, 80),
            non_vip: tcp([192, 0, 2, 7], 40000, [10, 0, 0, 99], 80),
            syn: SCENE.tcp4(([192, 0, 2, 8], 40001), (vip, 80), "S", &[]),
        }
    }
}

/// Alternating rounds of a targeted row and its floor.
const ROUNDS: u32 = 7;

/// A case measured in alternation with its floor: medians of each and of the round ratios.
struct Paired {
    ns: f64,
    floor: f64,
    ratio: f64,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `ROUNDS` rounds of `measure(floor, round)`, the floor first (ns per packet each).
fn paired(mut measure: impl FnMut(bool, u32) -> anyhow::Result<f64>) -> anyhow::Result<Paired> {
    let (mut floors, mut cases, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let f = measure(true, round)?;
        let c = measure(false, round)?;
        floors.push(f);
        cases.push(c);
        ratios.push(c / f);
    }
    Ok(Paired {
        ns: median(cases),
        floor: median(floors),
        ratio: median(ratios),
    })
}

/// Mean ns per pass of one run of `REPEAT` passes over `frame`.
fn once(prog: &Xdp, frame: &[u8]) -> anyhow::Result<f64> {
    test_run(prog, frame, REPEAT, None)
}

fn paired_row(name: String, p: &Paired, target: f64) -> Row {
    Row {
        ratio: Some(p.ratio),
        ..row(name, p.ns, p.floor, Some(target))
    }
}

fn flow_misses(world: &World) -> anyhow::Result<u64> {
    Ok(world
        .dp
        .stats
        .global()?
        .flow(lb_common::FlowEvent::MissNotSyn))
}

/// The benchmark's load options: the agent's defaults, except that `BENCH_FLOWS` sizes the
/// flow table and `BENCH_FLOW_CACHE` the flow cache (slots per CPU, 0: none).
pub(crate) fn bench_options(per_cpu: bool) -> lb_userspace::LoadOptions {
    let env = |name: &str, default: u32| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    lb_userspace::LoadOptions {
        flow_entries: env("BENCH_FLOWS", lb_common::DEFAULT_FLOW_ENTRIES),
        per_cpu_flows: per_cpu,
        flow_cache_slots: env("BENCH_FLOW_CACHE", lb_common::DEFAULT_FLOW_CACHE_SLOTS),
        ..World::options()
    }
}

/// Rows for one flow-table kind; `with_floors` adds the floor and flow-table-independent rows.
pub fn packet_rows(per_cpu: bool, with_floors: bool) -> anyhow::Result<Vec<Row>> {
    let opts = bench_options(per_cpu);
    let mut world = World::with_options(opts)?;
    let label = if per_cpu {
        "per-CPU LRU lists"
    } else {
        "shared LRU"
    };
    let vip = [10, 0, 0, 10];
    let Frames {
        established,
        non_vip,
        syn,
    } = Frames::new(vip);
    // Its first packet puts the flow on probation, the second makes it established.
    world.run(&established)?;
    world.run(&established)?;
    // Single runs: round `r` sends its own `chunk` distinct clients.
    let chunk = NEW_FLOWS / ROUNDS;
    let single_frame = |i| {
        let (c, p) = client(i);
        tcp(c, p, vip, 80)
    };

    let floor = ns_repeat(world.dp.pass_program()?, &established, REPEAT)?;
    let harness = ns_repeat(
        world.dp.extra_program("bench_next_client")?,
        &established,
        REPEAT,
    )?;
    let parse_only = ns_repeat(world.dp.extra_program("bench_parse")?, &established, REPEAT)?;
    let parse_lookup = ns_repeat(
        world.dp.extra_program("bench_parse_lookup")?,
        &established,
        REPEAT,
    )?;
    // Where an established packet's time goes: harnesses that follow its path up to a stage
    // (the product's own functions), and the least any flow-keeping balancer does, each in
    // alternating rounds with the floor. Only with the floors (one flow-table kind).
    let stages = if with_floors {
        stage_rows(&mut world, &established, &non_vip)?
    } else {
        Vec::new()
    };
    // The floor is XDP_PASS on the established frame, next to each round of the case.
    let mut repeat_case = |frame: &[u8]| {
        paired(|floor, _| {
            if floor {
                once(world.dp.pass_program()?, &established)
            } else {
                once(world.dp.lb_program()?, frame)
            }
        })
    };
    let nv = repeat_case(&non_vip)?;
    let est = repeat_case(&established)?;
    // The same flow in a program loaded without the flow cache: every packet pays the flow
    // table's lookup (what a flow the cache does not hold costs).
    let mut uncached = World::with_options(lb_userspace::LoadOptions {
        flow_cache_slots: 0,
        ..opts
    })?;
    uncached.run(&established)?;
    uncached.run(&established)?;
    let est_uncached = paired(|floor, _| {
        if floor {
            once(uncached.dp.pass_program()?, &established)
        } else {
            once(uncached.dp.lb_program()?, &established)
        }
    })?;
    // A SYN is placed by the slot table every time and never remembered: the same frame
    // repeated measures the placement path.
    let syn_placed = repeat_case(&syn)?;
    let new_single = paired(|floor, round| {
        let prog = if floor {
            world.dp.pass_program()?
        } else {
            world.dp.lb_program()?
        };
        ns_single(prog, chunk, None, |i| single_frame(round * chunk + i))
    })?;
    let before = flow_misses(&world)?;
    // Each round starts from its own client range: no pass meets a flow placed before.
    let new_repeat = paired(|floor, round| {
        if floor {
            once(world.dp.pass_program()?, &established)
        } else {
            let first = tcp([100, 64 + round as u8, 0, 0], 1, vip, 80);
            once(world.dp.extra_program("bench_lb_new_flow")?, &first)
        }
    })?;
    let placed = flow_misses(&world)? - before;
    anyhow::ensure!(
        placed >= u64::from(ROUNDS) * u64::from(REPEAT),
        "new-flow harness passes were not all new flows ({placed} misses)"
    );

    let mut rows = Vec::new();
    if with_floors {
        rows.push(row(
            format!("XDP_PASS floor (repeat {REPEAT})"),
            floor,
            floor,
            None,
        ));
        rows.push(paired_row("non-VIP packet".into(), &nv, 1.3));
        rows.push(row(
            "next-client harness alone".into(),
            harness,
            floor,
            None,
        ));
    }
    rows.push(row(
        format!("  of which: parsing (+ VIP-address bitmap), {label}"),
        parse_only,
        floor,
        None,
    ));
    rows.push(row(
        format!("  of which: parsing + flow-table lookup, {label}"),
        parse_lookup,
        floor,
        None,
    ));
    rows.extend(stages);
    rows.push(paired_row(
        format!("established TCP flow, {label}"),
        &est,
        2.0,
    ));
    rows.push(paired_row(
        format!("established TCP flow, {label}, no flow cache"),
        &est_uncached,
        2.0,
    ));
    rows.push(paired_row(
        format!("SYN, placed and not remembered, {label}"),
        &syn_placed,
        4.0,
    ));
    rows.push(paired_row(
        format!("new TCP flow (first ACK, onto probation), {label} (harness included)"),
        &new_repeat,
        4.0,
    ));
    if with_floors {
        rows.push(row(
            format!("XDP_PASS floor ({NEW_FLOWS} single runs)"),
            new_single.floor,
            new_single.floor,
            None,
        ));
    }
    rows.push(paired_row(
        format!("new TCP flow, {label} ({NEW_FLOWS} single runs)"),
        &new_single,
        4.0,
    ));
    Ok(rows)
}

/// One harness row of "where an established packet's time goes": the program, its label,
/// whether it runs on the non-VIP frame (else the established one), and the XDP action of
/// the path it measures.
struct StageRow {
    prog: &'static str,
    label: &'static str,
    non_vip: bool,
    action: u32,
}

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const STAGES: [StageRow; 7] = [
    StageRow {
        prog: "bench_bare",
        label: "bare minimum of any flow-keeping balancer (harness: fixed IPv4/TCP parse, one array read, MACs, XDP_TX; not the product)",
        non_vip: false,
        action: XDP_TX,
    },
    StageRow {
        prog: "bench_stage_parse",
        label: "stage 1: parsing (pre-filter, the express lane's IPv4/TCP read, the key's words)",
        non_vip: false,
        action: XDP_PASS,
    },
    StageRow {
        prog: "bench_stage_cache",
        label: "stage 2: + this CPU's cache slot (CPU id, index, key compare, tick)",
        non_vip: false,
        action: XDP_TX,
    },
    StageRow {
        prog: "bench_stage_decide",
        label: "stage 3: + the entry still decides (VIP, backend, rules), hit counted",
        non_vip: false,
        action: XDP_TX,
    },
    StageRow {
        prog: "bench_stage_forward",
        label: "stage 4: + MAC rewrite, XDP_TX",
        non_vip: false,
        action: XDP_TX,
    },
    StageRow {
        prog: "bench_stage_count",
        label: "stage 5: + VIP, backend and reason counters (all of the product's work)",
        non_vip: false,
        action: XDP_TX,
    },
    StageRow {
        prog: "bench_prefilter",
        label: "non-VIP packet, pre-filter alone (without its counter)",
        non_vip: true,
        action: XDP_PASS,
    },
];

/// The harness rows of "where an established packet's time goes" (`lb-ebpf/src/bench.rs`):
/// each stage includes the ones before it. Each harness must first take the path it is
/// named for (a harness that misses its cache slot returns early, and would measure that):
/// its first pass fills what it reads, and a refill at a cache-tick boundary costs one more.
fn stage_rows(world: &mut World, established: &[u8], non_vip: &[u8]) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for stage in &STAGES {
        let frame = if stage.non_vip { non_vip } else { established };
        let prog = world.dp.extra_program(stage.prog)?;
        let mut got = run_once(prog, frame)?.0;
        for _ in 0..2 {
            if got == stage.action {
                break;
            }
            got = run_once(prog, frame)?.0;
        }
        anyhow::ensure!(
            got == stage.action,
            "bench harness {} returned {got}, not the action {} of the path it measures",
            stage.prog,
            stage.action
        );
        let p = paired(|floor, _| {
            if floor {
                once(world.dp.pass_program()?, established)
            } else {
                once(world.dp.extra_program(stage.prog)?, frame)
            }
        })?;
        rows.push(Row {
            ratio: Some(p.ratio),
            ..row(format!("  {}", stage.label), p.ns, p.floor, None)
        });
    }
    Ok(rows)
}

/// Two programs loaded side by side with the bench's options (shared table): with the flow
/// cache, and without it.
pub(crate) fn with_and_without_cache() -> anyhow::Result<(World, World)> {
    let opts = bench_options(false);
    let with = World::with_options(opts)?;
    let without = World::with_options(lb_userspace::LoadOptions {
        flow_cache_slots: 0,
        ..opts
    })?;
    Ok((with, without))
}

/// `BENCH_ONLY=cache`: the flow cache's gain and its price, each in 15 alternating rounds of
/// two programs loaded side by side (with the cache, without; the shared table at the bench's
/// size), so the comparison does not rest
/// on two separate runs of a drifting VM: the established flow in repeat mode (floor, with,
/// without), and new flows in single runs (floor, with, without; each round its own clients):
/// a new flow's first packet also probes this CPU's cache slot, one more cold line.
pub fn cache_rows() -> anyhow::Result<Vec<Row>> {
    const N: u32 = 15;
    let vip = [10, 0, 0, 10];
    let established = tcp([192, 0, 2, 7], 40000, vip, 80);
    let (mut with, mut without) = with_and_without_cache()?;
    for w in [&mut with, &mut without] {
        w.run(&established)?;
        w.run(&established)?;
    }
    let mut repeat = Triple::default();
    for _ in 0..N {
        repeat.push(
            once(with.dp.pass_program()?, &established)?,
            once(with.dp.lb_program()?, &established)?,
            once(without.dp.lb_program()?, &established)?,
        );
    }
    let chunk = NEW_FLOWS / N;
    let mut single = Triple::default();
    for round in 0..N {
        let frame = |i| {
            let (c, p) = client(round * chunk + i);
            tcp(c, p, vip, 80)
        };
        let floor = ns_single(with.dp.pass_program()?, chunk, None, frame)?;
        // Which program meets the round's frames first alternates: the first pays for any
        // cold lines the frames' buffers bring.
        let (w, wo) = if round % 2 == 0 {
            let w = ns_single(with.dp.lb_program()?, chunk, None, frame)?;
            (w, ns_single(without.dp.lb_program()?, chunk, None, frame)?)
        } else {
            let wo = ns_single(without.dp.lb_program()?, chunk, None, frame)?;
            (ns_single(with.dp.lb_program()?, chunk, None, frame)?, wo)
        };
        single.push(floor, w, wo);
    }
    let mut rows = repeat.rows(
        format!("{N} rounds of {REPEAT} passes"),
        "established TCP flow",
        2.0,
    );
    rows.extend(single.rows(
        format!("{N} rounds of {chunk} single runs"),
        "new TCP flow, single runs",
        4.0,
    ));
    Ok(rows)
}

/// Per-round figures of a floor and a case with and without the flow cache.
#[derive(Default)]
struct Triple {
    floors: Vec<f64>,
    with: Vec<f64>,
    without: Vec<f64>,
}

impl Triple {
    fn push(&mut self, floor: f64, with: f64, without: f64) {
        self.floors.push(floor);
        self.with.push(with);
        self.without.push(without);
    }

    /// The floor's row and the case's two rows, each ratio the median of the round ratios.
    fn rows(self, rounds: String, case: &str, target: f64) -> Vec<Row> {
        let ratio = |v: &[f64]| median(v.iter().zip(&self.floors).map(|(c, f)| c / f).collect());
        let (with_ratio, without_ratio) = (ratio(&self.with), ratio(&self.without));
        let floor = median(self.floors);
        vec![
            row(format!("XDP_PASS floor ({rounds})"), floor, floor, None),
            Row {
                ratio: Some(with_ratio),
                ..row(
                    format!("{case}, flow cache"),
                    median(self.with),
                    floor,
                    Some(target),
                )
            },
            Row {
                ratio: Some(without_ratio),
                ..row(
                    format!("{case}, no flow cache"),
                    median(self.without),
                    floor,
                    Some(target),
                )
            },
        ]
    }
}

/// `BENCH_ONLY=spin`: one path, run for a bounded while (`BENCH_CASE`: `non-vip`,
/// `established` (from this CPU's flow cache), `established-table` (no flow cache: the flow
/// table's lookup), `syn`; 40 runs of `REPEAT` passes), so that a sampling profiler sees
/// only it: `BENCH_ONLY=spin BENCH_CASE=syn perf record -e cpu-clock -C 1 -- taskset -c 1
/// lb-bench`, then `perf report --sort sym`. Prints the path's and the floor's ns per pass.
pub fn spin() -> anyhow::Result<()> {
    const RUNS: u32 = 40;
    let case = std::env::var("BENCH_CASE").unwrap_or_else(|_| "established".into());
    let frames = Frames::new([10, 0, 0, 10]);
    let (frame, cache) = match case.as_str() {
        "non-vip" => (&frames.non_vip, true),
        "established" => (&frames.established, true),
        "established-table" => (&frames.established, false),
        "syn" => (&frames.syn, true),
        other => anyhow::bail!(
            "BENCH_CASE {other:?}: expected non-vip, established, established-table or syn"
        ),
    };
    let opts = bench_options(false);
    let mut world = World::with_options(lb_userspace::LoadOptions {
        flow_cache_slots: if cache { opts.flow_cache_slots } else { 0 },
        ..opts
    })?;
    world.run(&frames.established)?;
    world.run(&frames.established)?;
    let floor = once(world.dp.pass_program()?, frame)?;
    let mut ns = Vec::new();
    for _ in 0..RUNS {
        ns.push(once(world.dp.lb_program()?, frame)?);
    }
    println!(
        "{case}: {:.1} ns per pass (median of {RUNS} runs of {REPEAT}), floor {floor:.1}",
        median(ns)
    );
    Ok(())
}
