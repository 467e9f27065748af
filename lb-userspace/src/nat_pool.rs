//! The NAT address pool (`lb run --nat-source ADDR`, repeatable): the addresses NAT'ed
//! connections leave from, per family. Ports are per (pool address, backend), so a pool of
//! `A` addresses gives each backend `A` times the ports of one address. Without
//! `--nat-source`, a family's pool is its encapsulation source alone.
use std::net::IpAddr;

use lb_common::NAT_POOL_MAX;

use crate::Error;

/// The pool from the `--nat-source` addresses given (in order), or, for a family none is
/// given for, `fallback` (the encapsulation sources). One line for the first bad address:
/// not unicast, an IPv4 address written as IPv6, given twice, or more than
/// [`NAT_POOL_MAX`] of a family.
pub fn nat_pool(given: &[IpAddr], fallback: &[IpAddr]) -> Result<Vec<IpAddr>, Error> {
    let bad = |a: &IpAddr, why: &str| Error::Invalid(format!("--nat-source {a}: {why}"));
    let mut out: Vec<IpAddr> = Vec::new();
    for a in given {
        let unicast = match a {
            IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
            IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
        };
        if !unicast || a.is_loopback() {
            return Err(bad(a, "not a unicast address backends can answer to"));
        }
        if let IpAddr::V6(v6) = a
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Err(bad(
                a,
                &format!("an IPv4 address written as IPv6: give it as {v4}"),
            ));
        }
        if out.contains(a) {
            return Err(bad(a, "given twice"));
        }
        let same = out.iter().filter(|b| b.is_ipv4() == a.is_ipv4()).count();
        if same as u32 >= NAT_POOL_MAX {
            return Err(bad(
                a,
                &format!(
                    "at most {NAT_POOL_MAX} {} NAT source addresses",
                    if a.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            ));
        }
        out.push(*a);
    }
    for f in fallback {
        if !out.iter().any(|a| a.is_ipv4() == f.is_ipv4()) {
            out.push(*f);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn given_addresses_replace_their_familys_source() {
        let pool = nat_pool(
            &ips(&["10.0.9.1", "10.0.9.2"]),
            &ips(&["10.0.0.2", "fd00::2"]),
        )
        .unwrap();
        assert_eq!(pool, ips(&["10.0.9.1", "10.0.9.2", "fd00::2"]));
        assert_eq!(
            nat_pool(&[], &ips(&["10.0.0.2"])).unwrap(),
            ips(&["10.0.0.2"])
        );
        let most: Vec<String> = (1..=NAT_POOL_MAX).map(|i| format!("10.0.9.{i}")).collect();
        let most: Vec<&str> = most.iter().map(String::as_str).collect();
        assert_eq!(
            nat_pool(&ips(&most), &[]).unwrap().len(),
            NAT_POOL_MAX as usize
        );
    }

    #[test]
    fn bad_addresses_are_refused_with_one_line() {
        let over: Vec<String> = (1..=NAT_POOL_MAX + 1)
            .map(|i| format!("10.0.9.{i}"))
            .collect();
        let over: Vec<&str> = over.iter().map(String::as_str).collect();
        let too_many = format!("10.0.9.{}: at most {NAT_POOL_MAX} IPv4", NAT_POOL_MAX + 1);
        for (list, why) in [
            (vec!["10.0.9.1", "10.0.9.1"], "10.0.9.1: given twice"),
            (vec!["0.0.0.0"], "not a unicast"),
            (vec!["224.0.0.1"], "not a unicast"),
            (vec!["127.0.0.1"], "not a unicast"),
            (vec!["ff02::1"], "not a unicast"),
            (vec!["::ffff:10.0.9.1"], "give it as 10.0.9.1"),
            (over, too_many.as_str()),
        ] {
            let e = nat_pool(&ips(&list), &[]).unwrap_err().to_string();
            assert!(e.contains(why) && !e.contains('\n'), "{list:?}: {e}");
        }
    }
}
