//! `BENCH_ONLY=newflow`: where a new flow's nanoseconds go in single runs. A new flow's first
//! packet (the handshake's ACK of a client no table knows) runs the whole path once, on cold
//! memory: each stage below is a harness that does parsing plus one more piece of that path,
//! and every row's figure is measured on clients of its own (no program meets a flow another
//! one touched), in rounds where the programs take turns going first. The difference between
//! a stage's row and the parsing row is what that piece adds to a packet nobody has seen.
use aya::programs::Xdp;

use super::{NEW_FLOWS, Row, client, ns_single, row, tcp};
use crate::packet::{median, with_and_without_cache};

const ROUNDS: u32 = 15;

/// The stages, in the order of the path: (row name, program, world).
const STAGES: [(&str, Stage); 8] = [
    ("XDP_PASS floor", Stage::Pass),
    (
        "parsing (+ VIP-address bitmap)",
        Stage::Extra("bench_parse"),
    ),
    (
        "parsing + this CPU's flow-cache slot (probe, miss)",
        Stage::Extra("bench_parse_cache"),
    ),
    (
        "parsing + established table lookup (miss)",
        Stage::Extra("bench_parse_lookup"),
    ),
    (
        "parsing + probation table probe (miss)",
        Stage::Extra("bench_parse_probation"),
    ),
    (
        "parsing + placement (VIP, slot, backend)",
        Stage::Extra("bench_place"),
    ),
    ("whole new flow, no flow cache", Stage::Lb { cache: false }),
    ("whole new flow, flow cache", Stage::Lb { cache: true }),
];

#[derive(Clone, Copy)]
enum Stage {
    Pass,
    Extra(&'static str),
    Lb { cache: bool },
}

pub fn new_flow_stage_rows() -> anyhow::Result<Vec<Row>> {
    let (mut with, mut without) = with_and_without_cache()?;
    let vip = [10, 0, 0, 10];
    let chunk = NEW_FLOWS / ROUNDS;
    let n = STAGES.len() as u32;
    let mut ns = vec![Vec::new(); STAGES.len()];
    let mut ratios = vec![Vec::new(); STAGES.len()];
    for round in 0..ROUNDS {
        let mut this_round = vec![0.0; STAGES.len()];
        for turn in 0..n {
            // The programs take turns going first: the first of a round meets the VM's
            // caches after the previous round's last.
            let s = ((turn + round) % n) as usize;
            let first = (round * n + s as u32) * chunk;
            let prog: &Xdp = match STAGES[s].1 {
                Stage::Pass => with.dp.pass_program()?,
                Stage::Extra(name) => with.dp.extra_program(name)?,
                Stage::Lb { cache: true } => with.dp.lb_program()?,
                Stage::Lb { cache: false } => without.dp.lb_program()?,
            };
            this_round[s] = ns_single(prog, chunk, None, |i| {
                let (c, p) = client(first + i);
                tcp(c, p, vip, 80)
            })?;
        }
        for (s, v) in this_round.iter().enumerate() {
            ns[s].push(*v);
            ratios[s].push(v / this_round[0]);
        }
    }
    let floor = median(ns[0].clone());
    let parse = median(ns[1].clone());
    let mut rows = Vec::new();
    for (s, (name, _)) in STAGES.iter().enumerate() {
        let m = median(ns[s].clone());
        let name = match s {
            0 => format!("{name} ({ROUNDS} rounds of {chunk} single runs, own clients each)"),
            1 => format!("  new flow, {name}"),
            _ => format!("  new flow, {name}: {:+.0} ns over parsing", m - parse),
        };
        let target = matches!(STAGES[s].1, Stage::Lb { .. }).then_some(4.0);
        rows.push(Row {
            ratio: Some(median(ratios[s].clone())),
            ..row(name, m, floor, target)
        });
    }
    Ok(rows)
}
