//! The store secured and bounded, on a real etcd 3.4 started by the test: TLS with client
//! certificates under a whole fleet (the same backend whichever node, as `config` checks on a
//! plain etcd), every wrong TLS setup refused at start with its one line; username/password
//! authentication with a role per cluster prefix, set up by exactly the commands of
//! docs/fleet.md; and values too large to take, which must not stop a node from following.
use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use lb_tests::{
    AgentDir, Netns,
    etcd::{Etcd, PORT, Security},
    fleet::{Fleet, FleetNet as _, NODES},
    routed::VIP4,
    traffic::{moved, udp_picks},
    wait_until,
};

/// `lb run` on `lo` of `ns` for cluster `cluster`, with `args`, that must be refused before
/// it attaches anything: its exit code and stderr. `--duration` bounds a start wrongly
/// accepted; the state file must never have been written.
fn refused(ns: &Netns, cluster: &str, args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
    let dir = AgentDir::new("lbsec")?;
    let out = ns
        .lb()?
        .arg("--socket")
        .arg(dir.socket())
        .args([
            "run",
            "--iface",
            "lo",
            "--mode",
            "generic",
            "--duration",
            "3",
        ])
        .args(["--cluster", cluster, "--node", "x"])
        .args(["--vip-prefix", "10.0.0.0/8"])
        .arg("--state-file")
        .arg(dir.state_file())
        .arg("--bpffs")
        .arg(&dir.bpffs)
        .args(args)
        .output()
        .context("running lb run")?;
    assert!(
        !dir.state_file().exists(),
        "a refused start wrote its state file"
    );
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

/// Asserts that `lb run ARGS` is refused with exit `code` and exactly the line `want`.
fn refused_with(
    ns: &Netns,
    cluster: &str,
    args: &[&str],
    code: i32,
    want: &str,
) -> anyhow::Result<()> {
    let (got_code, err) = refused(ns, cluster, args)?;
    println!("refused: {err}");
    assert_eq!(err, want, "lb run {args:?}");
    assert_eq!(got_code, Some(code), "lb run {args:?}: {err}");
    Ok(())
}

/// Waits until the agent of `dir` has connected to its store (it serves before that).
fn connected(dir: &AgentDir) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(10),
        "the node connected to etcd",
        || Ok(dir.stats()?.store.is_some_and(|s| s.connected)),
        || format!("{:?}", dir.stats().map(|s| s.store)),
    )?;
    Ok(())
}

/// TLS with client certificates: the fleet follows and writes through it and every node
/// picks the same backend for 1,000 flows; a node without the CA, with a wrong CA, without a
/// client certificate, with one from another CA, or speaking plain text to the TLS port is
/// refused with its line.
#[test]
fn tls_with_client_certificates() -> anyhow::Result<()> {
    let f = Fleet::with_security("fls", Security::Tls { client_certs: true })?;
    let udp = format!("{VIP4}:80/udp");
    f.gue_vip(
        1,
        &udp,
        &["10.41.0.2", "10.42.0.2", "10.43.0.2"],
        &["--second-chance", "0"],
    )?;
    f.converged(&udp, None)?;
    // Each node alone at the router: the other two drained, as an operator would.
    let seen: Vec<BTreeMap<u16, String>> =
        f.through_each(&format!("{VIP4}/32"), |_| udp_picks(&f.net.client))?;
    let differ = moved(&seen);
    println!("over TLS, 1000 UDP flows through each node alone: {differ} met a different backend");
    assert_eq!(differ, 0);
    assert_eq!(
        seen[0]
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );
    // Statuses (leases, the nodes' watch) go over TLS too.
    wait_until(
        Duration::from_secs(5),
        "every node in `lb cluster status`",
        || Ok(f.cluster(0)?.nodes.len() == NODES),
        || format!("{:?}", f.cluster(0)),
    )?;

    let ns = f.net.node_ns(0);
    let url = f.etcd.url_at("10.30.0.1");
    let plain = format!("etcd://10.30.0.1:{PORT}");
    let (ca, other_ca) = (f.etcd.cert("ca.pem"), f.etcd.cert("other-ca.pem"));
    let (cert, key) = (f.etcd.cert("client.pem"), f.etcd.cert("client-key.pem"));
    let (other_cert, other_key) = (
        f.etcd.cert("other-client.pem"),
        f.etcd.cert("other-client-key.pem"),
    );
    refused_with(
        ns,
        "t",
        &["--store", &url],
        2,
        "lb: --store https://: give --store-ca FILE, the CA that signed etcd's certificate (the system's public roots are not trusted for the store)",
    )?;
    refused_with(
        ns,
        "t",
        &[
            "--store",
            &url,
            "--store-ca",
            &other_ca,
            "--store-cert",
            &cert,
            "--store-key",
            &key,
        ],
        2,
        &format!(
            "lb: etcd {url}: reading the configuration: etcd's certificate is not trusted with --store-ca {other_ca} (invalid peer certificate: UnknownIssuer)"
        ),
    )?;
    refused_with(
        ns,
        "t",
        &["--store", &url, "--store-ca", &ca],
        9,
        &format!(
            "lb: etcd {url}: reading the configuration: etcd asks for a client certificate: give --store-cert and --store-key"
        ),
    )?;
    refused_with(
        ns,
        "t",
        &[
            "--store",
            &url,
            "--store-ca",
            &ca,
            "--store-cert",
            &other_cert,
            "--store-key",
            &other_key,
        ],
        9,
        &format!(
            "lb: etcd {url}: reading the configuration: etcd refused this node's client certificate: give --store-cert and --store-key signed by a CA etcd trusts"
        ),
    )?;
    refused_with(
        ns,
        "t",
        &["--store", &plain],
        2,
        &format!(
            "lb: etcd {plain}: reading the configuration: etcd speaks TLS there: use https:// with --store-ca (and a client certificate if etcd asks for one)"
        ),
    )?;
    Ok(())
}

/// The `etcdctl` lines of docs/fleet.md's access-control block.
fn documented_rbac() -> anyhow::Result<Vec<String>> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/fleet.md"))?;
    let block = doc
        .split("<!-- etcd-rbac")
        .nth(1)
        .and_then(|rest| rest.split("```sh").nth(1))
        .and_then(|b| b.split("```").next())
        .context("docs/fleet.md has no etcd-rbac block")?;
    let lines: Vec<String> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    anyhow::ensure!(lines.len() == 6 && lines.iter().all(|l| l.starts_with("etcdctl ")));
    Ok(lines)
}

/// Runs one documented line (`etcdctl ...`) with the passwords filled in.
fn run_line(etcd: &Etcd, line: &str, lb_password: &str) -> anyhow::Result<()> {
    let line = line
        .replace("ROOT_PASSWORD", "root-pw")
        .replace("LB_PASSWORD", lb_password);
    let args: Vec<&str> = line.split_whitespace().skip(1).collect();
    etcd.ctl(&args)?;
    Ok(())
}

/// Username/password auth over TLS with a role per cluster prefix, set up by the documented
/// commands: the right user follows and writes; a wrong password, another cluster's user and
/// a password file open to others are each refused with their line.
#[test]
fn passwords_and_a_role_per_cluster() -> anyhow::Result<()> {
    let ns = Netns::new("lbsa")?;
    let mut etcd = Etcd::start_with(
        &ns,
        "127.0.0.1",
        &["127.0.0.1"],
        Security::Tls {
            client_certs: false,
        },
    )?;
    let lines = documented_rbac()?;
    for l in lines.iter().filter(|l| !l.contains("auth enable")) {
        run_line(&etcd, l, "prod-pw")?;
    }
    // The same for a second cluster, `other`: its user must not reach `prod`.
    for l in lines
        .iter()
        .filter(|l| !l.contains("auth enable") && !l.contains("user add root"))
    {
        run_line(&etcd, &l.replace("prod", "other"), "other-pw")?;
    }
    run_line(&etcd, &lines[5], "")?;
    etcd.ctl_user = Some("root:root-pw".into());

    let url = etcd.url();
    let ca = etcd.cert("ca.pem");
    let good = etcd.file("prod.pw", "prod-pw\n", 0o600)?;
    let wrong = etcd.file("wrong.pw", "nope\n", 0o600)?;
    let other = etcd.file("other.pw", "other-pw\n", 0o600)?;
    let open = etcd.file("open.pw", "prod-pw\n", 0o644)?;
    let as_user = |user: &'static str, file: &str| -> Vec<String> {
        ["--store", &url, "--store-ca", &ca, "--store-user", user]
            .iter()
            .map(|s| s.to_string())
            .chain(["--store-password-file".to_string(), file.to_string()])
            .collect()
    };

    let dir = AgentDir::new("lbsa")?;
    let args = as_user("lb-prod", &good);
    let mut run: Vec<&str> = vec![
        "--mode",
        "generic",
        "--cluster",
        "prod",
        "--node",
        "n1",
        "--vip-prefix",
        "10.0.0.0/8",
    ];
    run.extend(args.iter().map(String::as_str));
    let _agent = dir.spawn_agent(&ns, "lo", &run)?;
    connected(&dir)?;
    dir.cli_ok(&["vip", "add", "10.0.0.10:80/tcp"])?;
    let keys = etcd.ctl(&["get", "--prefix", "--keys-only", "/xdp-lb/prod/vips/"])?;
    assert!(
        keys.contains("/xdp-lb/prod/vips/10.0.0.10:80/tcp"),
        "{keys}"
    );
    etcd.ctl(&["put", "/xdp-lb/prod/vips/10.0.0.11:80/tcp", "{}"])?;
    wait_until(
        Duration::from_secs(5),
        "a VIP written with etcdctl applied",
        || Ok(dir.vips()?.len() == 2),
        || format!("{:?}", dir.vips()),
    )?;
    println!("user lb-prod follows and writes /xdp-lb/prod/ over TLS");

    let refusals = [
        (
            "lb-prod",
            &wrong,
            9,
            format!(
                "lb: etcd {url}: connecting: authentication failed for user `lb-prod`: wrong user name or password (--store-user, --store-password-file)"
            ),
        ),
        (
            "lb-other",
            &other,
            9,
            format!(
                "lb: etcd {url}: reading the configuration: permission denied to user `lb-other` on /xdp-lb/prod/: grant its role readwrite on that prefix (etcdctl role grant-permission ROLE --prefix=true readwrite /xdp-lb/prod/)"
            ),
        ),
        (
            "lb-prod",
            &open,
            2,
            format!(
                "lb: --store-password-file {open}: open to group or others (mode 0644): `chmod 600` it, a secret others can read is not one"
            ),
        ),
    ];
    for (user, file, code, want) in refusals {
        let args = as_user(user, file);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused_with(&ns, "prod", &args, code, &want)?;
    }
    Ok(())
}

/// Junk values adding up to more than tonic's default 4 MiB message (four of 1.4 MiB, each
/// under etcd's 1.5 MiB request limit) and a VIP value above the 512 KiB cap, written with
/// etcdctl: the node keeps following, a VIP written after them applies, and each junk key is
/// rejected, counted once and shown.
#[test]
fn values_too_large_do_not_stop_a_node() -> anyhow::Result<()> {
    let ns = Netns::new("lbsz")?;
    let etcd = Etcd::start(&ns, "127.0.0.1")?;
    let dir = AgentDir::new("lbsz")?;
    let url = etcd.url();
    let _agent = dir.spawn_agent(
        &ns,
        "lo",
        &[
            "--mode",
            "generic",
            "--store",
            &url,
            "--cluster",
            "t",
            "--node",
            "n1",
            "--vip-prefix",
            "10.0.0.0/8",
        ],
    )?;
    connected(&dir)?;
    dir.cli_ok(&["vip", "add", "10.0.0.10:80/tcp"])?;
    let junk = vec![b'x'; 1400 * 1024];
    for i in 0..4 {
        etcd.ctl_with(&["put", &format!("/xdp-lb/t/vips/junk-{i}")], Some(&junk))?;
    }
    let mut big = br#"{"backends":{"10.0.0.2":{}}}"#.to_vec();
    big.resize(600 * 1024, b' ');
    etcd.ctl_with(&["put", "/xdp-lb/t/vips/10.0.0.12:80/tcp"], Some(&big))?;

    // Written through the node: its write reads a snapshot of all of it, as following does.
    dir.cli_ok(&["vip", "add", "10.0.0.11:80/tcp"])?;
    let names = || -> anyhow::Result<Vec<String>> {
        Ok(dir.vips()?.iter().map(|v| v.vip.to_string()).collect())
    };
    wait_until(
        Duration::from_secs(5),
        "the VIP written after the junk applied",
        || Ok(names()? == ["10.0.0.10:80/tcp", "10.0.0.11:80/tcp"]),
        || format!("{:?}", names()),
    )?;
    let store = dir.stats()?.store.context("no store in lb stats")?;
    println!("rejected: {:?}", store.rejected);
    assert!(store.connected, "{store:?}");
    assert_eq!(store.rejected_total, 5, "{store:?}");
    assert!(store.rejected.iter().any(|r| r.starts_with(
        "/xdp-lb/t/vips/10.0.0.12:80/tcp: value of 614400 bytes, above the 512 KiB limit"
    )));
    for i in 0..4 {
        let key = format!("/xdp-lb/t/vips/junk-{i}: value of 1433600 bytes");
        assert!(store.rejected.iter().any(|r| r.starts_with(&key)), "{key}");
    }
    // Another revision reads them again: still rejected, not counted again.
    dir.cli_ok(&["vip", "remove", "10.0.0.11:80/tcp"])?;
    wait_until(
        Duration::from_secs(5),
        "the removal applied",
        || Ok(names()? == ["10.0.0.10:80/tcp"]),
        || format!("{:?}", names()),
    )?;
    let store = dir.stats()?.store.context("no store in lb stats")?;
    assert_eq!(store.rejected_total, 5, "{store:?}");
    assert_eq!(store.rejected.len(), 5, "{store:?}");
    Ok(())
}
