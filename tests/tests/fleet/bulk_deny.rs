//! The fleet's deny list in bulk: `lb deny add --file` of 20,000 prefixes (200 etcd
//! transactions) on one node is live on every node, each node applying a batch of watch
//! events at once rather than the whole list per transaction; a write cut off by etcd's
//! death says how far it got, and the same command run again finishes it. Part of
//! `config::` (its fleet); `LB_DENY_BULK=100000` makes the same run the 100,000-prefix
//! measurement of docs/benchmarks.md.
use std::{
    collections::BTreeSet,
    io::Read as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::fleet::{Fleet, NODES};

/// Prefixes in the bulk write: 200 transactions of 100, enough that one apply per
/// transaction (200 per node) and one per batch (a handful) are far apart, small enough for
/// a few seconds on a loaded CI host. `LB_DENY_BULK` sets another count for a measurement.
pub const BULK: usize = 20_000;

fn bulk() -> anyhow::Result<usize> {
    let n = std::env::var("LB_DENY_BULK")
        .ok()
        .map_or(Ok(BULK), |v| v.parse())?;
    anyhow::ensure!(n >= 2_000, "LB_DENY_BULK of {n}: at least 2,000");
    Ok(n)
}

/// `n` with a comma between thousands, as `lb` writes counts.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A file of `n` prefixes (`client` among them) for `lb deny add --file`, removed on drop.
pub struct DenyFile {
    pub path: PathBuf,
    pub prefixes: BTreeSet<String>,
}

impl DenyFile {
    pub fn new(n: usize, client: &str) -> anyhow::Result<Self> {
        // /32s in 100.64.0.0/10 (shared address space, never a test's own address).
        let mut prefixes: BTreeSet<String> = (1..n)
            .map(|i| format!("100.{}.{}.{}/32", 64 + i / 65_536, (i / 256) % 256, i % 256))
            .collect();
        prefixes.insert(client.to_string());
        anyhow::ensure!(prefixes.len() == n, "{} prefixes", prefixes.len());
        let path = std::env::temp_dir().join(lb_tests::unique_name("deny"));
        let text: String = prefixes.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(&path, text)?;
        Ok(DenyFile { path, prefixes })
    }

    pub fn arg(&self) -> anyhow::Result<&str> {
        self.path.to_str().context("non-UTF-8 temp path")
    }
}

impl Drop for DenyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A spawned `lb` command, killed and reaped on drop.
struct Cli(Child);

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Each node's count of applied store revisions (`applies_total`).
pub fn applies(f: &Fleet) -> anyhow::Result<Vec<u64>> {
    (0..NODES)
        .map(|k| Ok(f.stats(k)?.store.context("store view")?.applies_total))
        .collect()
}

/// Node `k`'s deny list: prefix and seconds left (None: never ends).
pub fn deny_list(f: &Fleet, k: usize) -> anyhow::Result<Vec<(String, Option<u64>)>> {
    let v: serde_json::Value = serde_json::from_str(&f.lb(k, &["deny", "list", "--json"])?)?;
    v.as_array()
        .context("deny list --json is not an array")?
        .iter()
        .map(|e| {
            Ok((
                e["prefix"].as_str().context("prefix")?.to_string(),
                e["expires_in_s"].as_u64(),
            ))
        })
        .collect()
}

/// Waits until every node holds every prefix of `file` (and `others` more), each ending no
/// sooner than `min_left` seconds from now; returns the time it took.
pub fn until_live(
    f: &Fleet,
    file: &DenyFile,
    others: usize,
    min_left: Option<u64>,
    within: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for k in 0..NODES {
        lb_tests::wait_until(
            within.saturating_sub(start.elapsed()),
            &format!("node {k} holds all {} prefixes", file.prefixes.len()),
            || {
                let list = deny_list(f, k)?;
                let held = list
                    .iter()
                    .filter(|(p, left)| {
                        file.prefixes.contains(p)
                            && min_left.is_none_or(|m| left.is_some_and(|l| l >= m))
                    })
                    .count();
                Ok(held == file.prefixes.len() && list.len() == held + others)
            },
            || match deny_list(f, k) {
                Ok(l) => format!("{} entries", l.len()),
                Err(e) => e.to_string(),
            },
        )?;
    }
    Ok(start.elapsed())
}

fn deny_keys(f: &Fleet) -> anyhow::Result<usize> {
    let out = f.etcd.ctl(&[
        "get",
        "--prefix",
        "--keys-only",
        "--limit",
        "1",
        "-w",
        "json",
        "/xdp-lb/t/deny/",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["count"].as_u64().unwrap_or(0) as usize)
}

/// The lease TTL etcd granted the key of `prefix` with (seconds).
fn granted_ttl(f: &Fleet, prefix: &str) -> anyhow::Result<u64> {
    let out = f
        .etcd
        .ctl(&["get", &format!("/xdp-lb/t/deny/{prefix}"), "-w", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let lease = v["kvs"][0]["lease"].as_i64().context("no lease")?;
    let out = f
        .etcd
        .ctl(&["lease", "timetolive", &format!("{lease:x}")])?;
    // "lease 694d... granted with TTL(7201s), remaining(7195s)"
    let ttl = out
        .split("TTL(")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .context(out.clone())?;
    Ok(ttl.parse()?)
}

/// (c0) The bulk write, cut off and finished: `lb deny add --file` of [`BULK`] prefixes
/// (`client` among them) with `--expires 1h` on node 1, etcd killed once a thousand are in
/// it: the command fails saying how many it wrote and that the same command finishes; etcd
/// back, the same command with `--expires 2h` puts every prefix on every node with the new
/// end (and lease), each node applying far fewer times than the write's transactions.
pub fn bulk_deny(f: &mut Fleet, client: &str) -> anyhow::Result<()> {
    let n = bulk()?;
    let file = DenyFile::new(n, client)?;
    let before = applies(f)?;
    let socket = f.net.dir_at(1).socket();
    let mut cli = Cli(Command::new(lb_tests::proc::lb_binary()?)
        .arg("--socket")
        .arg(&socket)
        .args(["deny", "add", "--file", file.arg()?, "--expires", "1h"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running lb deny add")?);
    lb_tests::wait_until(
        Duration::from_secs(30),
        "a thousand prefixes of the bulk write in etcd",
        || Ok(deny_keys(f)? >= 1000),
        || format!("{:?}", deny_keys(f)),
    )?;
    f.etcd.stop();
    let status = {
        let start = Instant::now();
        loop {
            if let Some(s) = cli.0.try_wait()? {
                break s;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "lb deny add still running 30 s after etcd died"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut err = String::new();
    cli.0
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut err)?;
    println!("the bulk write with etcd killed midway: {}", err.trim());
    anyhow::ensure!(!status.success(), "lb deny add succeeded with etcd killed");
    let tail = format!(" of {} prefixes before: ", thousands(n));
    let written: usize = err
        .split("wrote ")
        .nth(1)
        .and_then(|s| s.split(&tail).next())
        .with_context(|| format!("no `wrote N{tail}` in: {err}"))?
        .replace(',', "")
        .parse()?;
    anyhow::ensure!(
        (1000..n).contains(&written) && written.is_multiple_of(100),
        "wrote {written}: {err}"
    );
    anyhow::ensure!(
        err.contains("run the same command again to finish: adding is idempotent"),
        "{err}"
    );
    f.etcd.resume()?;
    let in_etcd = deny_keys(f)?;
    anyhow::ensure!(
        in_etcd >= written,
        "{in_etcd} keys in etcd after a write of {written}"
    );

    // The same command again, with a later end: every entry takes it.
    let start = Instant::now();
    f.lb(
        1,
        &["deny", "add", "--file", file.arg()?, "--expires", "2h"],
    )?;
    let bound = Duration::from_secs(60 + n as u64 / 1000);
    let took = until_live(f, &file, 0, Some(3600), bound)?;
    let after = applies(f)?;
    let applied: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let transactions = (written + n) / 100;
    println!(
        "{n} prefixes again with `lb deny add --file` (the command {:?}): live on all {NODES} nodes after {took:?}; applies per node {applied:?} for {transactions} transactions and one reconnection",
        start.elapsed()
    );
    for (k, n) in applied.iter().enumerate() {
        anyhow::ensure!(
            *n as usize * 3 <= transactions,
            "node {k} applied {n} times for {transactions} transactions"
        );
    }
    for p in [client, "100.64.0.1/32", "100.64.78.31/32"] {
        let ttl = granted_ttl(f, p)?;
        anyhow::ensure!(ttl > 3601, "{p}: lease of {ttl} s, not the re-run's");
    }
    Ok(())
}
