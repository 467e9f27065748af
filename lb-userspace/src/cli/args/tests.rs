//! The command line's parsing, valid and refused.
use clap::Parser as _;

use super::*;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
}

#[test]
fn valid_commands_parse() {
    for args in [
        &[
            "run",
            "--iface",
            "eth0",
            "--mode",
            "generic",
            "--keep-on-exit",
        ][..],
        &[
            "vip",
            "add",
            "10.0.0.10:80/tcp",
            "--health",
            "http",
            "--rise",
            "3",
        ],
        &["vip", "add", "[2001:db8::10]:*/udp", "--source-hash"],
        &[
            "backend",
            "add",
            "10.0.0.10:80/tcp",
            "10.0.0.2",
            "--weight",
            "65535",
            "--mac",
            "02:00:00:00:00:02",
        ],
        &["backend", "weight", "10.0.0.10:80/tcp", "10.0.0.2", "0"],
        &["backend", "drain", "10.0.0.10:80/tcp", "10.0.0.2", "--undo"],
        &["trace", "192.0.2.1:5000", "10.0.0.10:80/tcp", "--json"],
        &["stats", "--watch", "--count", "2"],
        &["apply", "-f", "lb.toml", "--dry-run"],
        &["samples", "--count", "3", "--base-port", "8000"],
        &[
            "vip",
            "add",
            "10.0.0.10:80/tcp",
            "--announce-min-serving",
            "65535",
        ],
    ] {
        assert!(parse(args).is_ok(), "{args:?}: {:?}", parse(args).err());
    }
}

#[test]
fn invalid_arguments_are_refused_with_the_reason() {
    for (args, why) in [
        (
            &[
                "backend",
                "add",
                "10.0.0.10:80/tcp",
                "10.0.0.2",
                "--weight",
                "65536",
            ][..],
            "65536",
        ),
        (
            &["backend", "add", "10.0.0.10:80", "10.0.0.2"],
            "missing /tcp",
        ),
        (
            &["backend", "add", "10.0.0.10:80/tcp", "10.0.0.300"],
            "not an IPv4 or IPv6 address",
        ),
        (
            &["backend", "add", "10.0.0.10:80/tcp", "10.0.0.2:0"],
            "port must be 1-65535",
        ),
        (
            &[
                "backend",
                "add",
                "10.0.0.10:80/tcp",
                "10.0.0.2",
                "--weight",
                "-5",
            ],
            "weight -5 is out of range",
        ),
        (
            &["backend", "weight", "10.0.0.10:80/tcp", "10.0.0.2", "-1"],
            "out of range",
        ),
        (&["vip", "add", "2001:db8::50:80/tcp"], "needs brackets"),
        (
            &[
                "backend",
                "add",
                "10.0.0.10:80/tcp",
                "10.0.0.2",
                "--mac",
                "02:00",
            ],
            "invalid MAC",
        ),
        (&["vip", "add", "10.0.0.10:80/icmp"], "tcp or udp"),
        (&["run", "--iface", "eth0", "--mode", "turbo"], "turbo"),
        (
            &["trace", "192.0.2.1", "10.0.0.10:80/tcp"],
            "invalid socket address",
        ),
        (
            &[
                "vip",
                "add",
                "10.0.0.10:80/tcp",
                "--announce-min-serving",
                "0",
            ],
            "`0` is not a backend count: use a whole number 1-65535",
        ),
        (
            &[
                "vip",
                "add",
                "10.0.0.10:80/tcp",
                "--announce-min-serving",
                "65536",
            ],
            "`65536` is not a backend count",
        ),
    ] {
        let err = parse(args).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(why), "{args:?}: {err}");
    }
}
