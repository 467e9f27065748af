//! The load-time options (`LoadOptions`): map sizes and the constants the program is loaded
//! with, their checks and the entries each map gets. Pure logic apart from loading, so the
//! sizing rules are read and unit-tested in one place.
use lb_common::{
    Capacity, DEFAULT_FLOW_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, FLOW_TABLE_PER_CPU,
    FLOW_TABLE_SHARED, LbConfig,
};

use crate::Error;

/// Map sizes and constants fixed when the program is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Slot-table size M; must be prime.
    pub ring_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_entries: u32,
    pub hash_seed: u64,
    /// Shared LRU (default) or one LRU per CPU.
    pub per_cpu_flows: bool,
    /// No flow table at all (`--flow-table off`): every packet placed by the slot table.
    pub flow_table_off: bool,
    /// Seconds a TCP flow entry lives after a FIN once the flow is quiet.
    pub fin_grace_s: u32,
    /// UDP port of GUE packets (host order).
    pub gue_port: u16,
    /// IPIP over IPv4: per-flow outer sources from this /16 (its first two bytes).
    pub ipip_prefix4: Option<std::net::Ipv4Addr>,
    /// IPIP over IPv6: per-flow outer sources from this /64 (its first eight bytes).
    pub ipip_prefix6: Option<std::net::Ipv6Addr>,
    /// NAT source ports (host order, inclusive).
    pub nat_ports: (u16, u16),
    /// Slots per CPU of the flow cache in front of the established table (a power of two);
    /// 0: none.
    pub flow_cache_slots: u32,
    /// NAT: established connections the tables hold (`--nat-entries`).
    pub nat_entries: u32,
    /// NAT: seconds a half-open pair lives (`--nat-half-open`).
    pub nat_half_open_s: u32,
    /// NAT: seconds an established TCP connection lives idle (`--nat-tcp-idle`).
    pub nat_tcp_idle_s: u32,
    /// NAT: seconds a connection closed without a backend TIME_WAIT keeps its port
    /// (`--nat-close-grace`).
    pub nat_grace_s: u32,
    /// NAT: percent of the half-open slots one source may hold (`--nat-half-open-share`).
    pub nat_half_share_pct: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ring_size: LbConfig::DEFAULT.ring_size,
            max_vips: DEFAULT_MAX_VIPS,
            max_backends: DEFAULT_MAX_BACKENDS,
            flow_entries: DEFAULT_FLOW_ENTRIES,
            hash_seed: LbConfig::DEFAULT.hash_seed,
            per_cpu_flows: false,
            flow_table_off: false,
            fin_grace_s: lb_common::DEFAULT_FIN_GRACE_S,
            gue_port: lb_common::DEFAULT_GUE_PORT,
            ipip_prefix4: None,
            ipip_prefix6: None,
            nat_ports: (
                lb_common::DEFAULT_NAT_PORT_MIN,
                lb_common::DEFAULT_NAT_PORT_MAX,
            ),
            flow_cache_slots: lb_common::DEFAULT_FLOW_CACHE_SLOTS,
            nat_entries: lb_common::DEFAULT_NAT_ENTRIES,
            nat_half_open_s: lb_common::DEFAULT_NAT_HALF_OPEN_S,
            nat_tcp_idle_s: lb_common::DEFAULT_NAT_TCP_IDLE_S,
            nat_grace_s: lb_common::DEFAULT_NAT_GRACE_S,
            nat_half_share_pct: lb_common::DEFAULT_NAT_HALF_SHARE_PCT,
        }
    }
}

impl LoadOptions {
    /// The number of entries capacity `c` gives under these options.
    pub fn capacity(&self, c: Capacity) -> Result<u32, Error> {
        let (shared, per_cpu) = self.flow_table_entries();
        Ok(match c {
            Capacity::Fixed(n) => n,
            Capacity::MaxVips => self.max_vips,
            Capacity::MaxBackends => self.max_backends,
            Capacity::SlotTables => self.max_vips * 2 * self.ring_size,
            Capacity::SharedFlows => shared,
            Capacity::PerCpuFlows => per_cpu,
            Capacity::Probation => self.probation_entries(),
            Capacity::FlowCache => cache_entries(self.cache_slots())?,
            Capacity::NatPairs => self.nat_entries + self.nat_half_slots(),
            Capacity::NatHalfOpen => self.nat_half_slots(),
        })
    }

    /// NAT half-open slots: a quarter of `--nat-entries` rounded up to a power of two (at
    /// least 256; the program masks a hash with it).
    pub fn nat_half_slots(&self) -> u32 {
        (self.nat_entries / 4).max(256).next_power_of_two()
    }

    /// Half-open slots one source address may hold: its share, at least the slots a new
    /// connection tries.
    pub fn nat_half_share(&self) -> u32 {
        let share = u64::from(self.nat_half_slots()) * u64::from(self.nat_half_share_pct) / 100;
        (share as u32).max(lb_common::NAT_HALF_PROBES)
    }

    /// Slots of the probation table: a quarter of the flow table rounded up to a power of
    /// two (at least 256; the program masks the flow's hash with it); one without a flow
    /// table.
    pub fn probation_entries(&self) -> u32 {
        if self.flow_table_off {
            1
        } else {
            (self.flow_entries / 4).max(256).next_power_of_two()
        }
    }

    /// Entries of the shared and the per-CPU-lists flow tables: the one not in use (both
    /// without a flow table) shrinks to one entry.
    pub fn flow_table_entries(&self) -> (u32, u32) {
        if self.flow_table_off {
            (1, 1)
        } else if self.per_cpu_flows {
            (1, self.flow_entries)
        } else {
            (self.flow_entries, 1)
        }
    }

    /// Slots per CPU of the flow cache in use: none without a flow table.
    pub fn cache_slots(&self) -> u32 {
        if self.flow_table_off {
            0
        } else {
            self.flow_cache_slots
        }
    }

    /// Checks the sizes before anything touches the kernel.
    pub fn validate(&self) -> Result<(), Error> {
        if !crate::maglev::is_prime(self.ring_size) {
            return Err(Error::Invalid(format!(
                "slot table size {} is not prime: pick a prime such as 65537 or 16381",
                self.ring_size
            )));
        }
        if self.flow_table_off && self.per_cpu_flows {
            return Err(Error::Invalid(
                "--per-cpu-flows shapes a flow table; with --flow-table off there is none".into(),
            ));
        }
        let (lo, hi) = self.nat_ports;
        if lo == 0 || lo > hi {
            return Err(Error::Invalid(format!(
                "NAT port range {lo}-{hi}: give LOW-HIGH with 1 <= LOW <= HIGH"
            )));
        }
        let c = self.flow_cache_slots;
        if c != 0 && (!c.is_power_of_two() || c > lb_common::MAX_FLOW_CACHE_SLOTS) {
            return Err(Error::Invalid(format!(
                "flow cache of {c} slots per CPU: give 0 (no cache) or a power of two up to {}",
                lb_common::MAX_FLOW_CACHE_SLOTS
            )));
        }
        validate_nat(self)?;
        if self.gue_port == 0 {
            return Err(Error::Invalid("the GUE port must not be 0".into()));
        }
        if self.max_vips == 0 || self.max_backends < 2 || self.flow_entries == 0 {
            return Err(Error::Invalid(
                "max VIPs, flow entries and max backends (>= 2) must be positive".into(),
            ));
        }
        let slots = u64::from(self.max_vips) * 2 * u64::from(self.ring_size);
        if slots > u64::from(u32::MAX) / 4 {
            return Err(Error::Invalid(format!(
                "{} VIPs x 2 x {} slots is too large for one slot array: lower one of them",
                self.max_vips, self.ring_size
            )));
        }
        Ok(())
    }

    pub fn config(&self) -> LbConfig {
        LbConfig {
            ring_size: self.ring_size,
            flow_table: if self.flow_table_off {
                lb_common::FLOW_TABLE_OFF
            } else if self.per_cpu_flows {
                FLOW_TABLE_PER_CPU
            } else {
                FLOW_TABLE_SHARED
            },
            hash_seed: self.hash_seed,
            fin_grace_s: self.fin_grace_s,
            gue_port: self.gue_port.to_be(),
            _pad0: 0,
            ipip_src_prefix4: self
                .ipip_prefix4
                .map_or(0, |p| u32::from_ne_bytes(p.octets())),
            probation_slots: self.probation_entries(),
            ipip_src_prefix6: self.ipip_prefix6.map_or([0; 4], |p| {
                let w = crate::net::addr_words(p.into());
                [w[0], w[1], 0, 0]
            }),
            nat_port_min: self.nat_ports.0,
            nat_port_max: self.nat_ports.1,
            flow_cache_slots: self.cache_slots(),
            nat_half_slots: self.nat_half_slots(),
            nat_half_share: self.nat_half_share(),
            nat_half_open_s: self.nat_half_open_s,
            nat_tcp_idle_s: self.nat_tcp_idle_s,
            nat_grace_s: self.nat_grace_s,
            _pad1: 0,
        }
    }
}

/// Most `--nat-entries` accepted: two hash entries of about 180 bytes per connection, so
/// this many need about 24 GB of kernel memory; the kernel refuses less than that on most
/// machines, and its refusal is reported with the option's name.
pub const MAX_NAT_ENTRIES: u32 = 1 << 26;

/// The NAT options' checks.
fn validate_nat(o: &LoadOptions) -> Result<(), Error> {
    if o.nat_entries == 0 || o.nat_entries > MAX_NAT_ENTRIES {
        return Err(Error::Invalid(format!(
            "--nat-entries {}: give 1 to {MAX_NAT_ENTRIES}",
            o.nat_entries
        )));
    }
    if o.nat_half_open_s == 0 || o.nat_tcp_idle_s == 0 || o.nat_grace_s == 0 {
        return Err(Error::Invalid(
            "--nat-half-open, --nat-tcp-idle and --nat-close-grace must be at least 1 second"
                .into(),
        ));
    }
    if o.nat_half_open_s > o.nat_tcp_idle_s {
        return Err(Error::Invalid(format!(
            "--nat-half-open {} s is longer than --nat-tcp-idle {} s: a handshake would outlive an idle connection",
            o.nat_half_open_s, o.nat_tcp_idle_s
        )));
    }
    if !(1..=100).contains(&o.nat_half_share_pct) {
        return Err(Error::Invalid(format!(
            "--nat-half-open-share {}: give a percentage from 1 to 100",
            o.nat_half_share_pct
        )));
    }
    Ok(())
}

/// Entries of the flow cache's array: a region of `slots` per possible CPU (one slot when
/// there is no cache: a map cannot be empty).
fn cache_entries(slots: u32) -> Result<u32, Error> {
    if slots == 0 {
        return Ok(1);
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs")(e))?;
    u32::try_from(cpus)
        .ok()
        .and_then(|c| c.checked_mul(slots))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "a flow cache of {slots} slots per CPU on {cpus} CPUs is more than 2^32 slots: give fewer slots"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::LoadOptions;

    #[test]
    fn the_flow_cache_is_a_power_of_two_or_none() {
        for slots in [0, 1, 4096, lb_common::MAX_FLOW_CACHE_SLOTS] {
            let opts = LoadOptions {
                flow_cache_slots: slots,
                ..LoadOptions::default()
            };
            assert!(opts.validate().is_ok(), "{slots}");
            assert_eq!(opts.config().flow_cache_slots, slots);
        }
        for slots in [3, 4095, lb_common::MAX_FLOW_CACHE_SLOTS * 2] {
            let opts = LoadOptions {
                flow_cache_slots: slots,
                ..LoadOptions::default()
            };
            let e = opts.validate().expect_err("refused").to_string();
            assert!(e.contains("power of two"), "{e}");
        }
        // Without a flow table there is nothing to cache.
        let off = LoadOptions {
            flow_table_off: true,
            ..LoadOptions::default()
        };
        assert_eq!(off.config().flow_cache_slots, 0);
    }

    #[test]
    fn nat_options_are_checked_and_sized() {
        let d = LoadOptions::default();
        assert_eq!((d.nat_half_slots(), d.nat_half_share()), (16384, 1638));
        let c = d.config();
        assert_eq!((c.nat_half_slots, c.nat_half_share), (16384, 1638));
        assert_eq!(
            d.capacity(lb_common::Capacity::NatPairs).ok(),
            Some(65536 + 16384)
        );
        // Small tables: at least 256 slots, and a share of at least the slots a SYN tries.
        let small = LoadOptions {
            nat_entries: 100,
            nat_half_share_pct: 1,
            ..d
        };
        assert_eq!((small.nat_half_slots(), small.nat_half_share()), (256, 4));
        for (bad, what) in [
            (
                LoadOptions {
                    nat_entries: 0,
                    ..d
                },
                "--nat-entries 0",
            ),
            (
                LoadOptions {
                    nat_entries: super::MAX_NAT_ENTRIES + 1,
                    ..d
                },
                "--nat-entries",
            ),
            (
                LoadOptions {
                    nat_half_open_s: 0,
                    ..d
                },
                "at least 1 second",
            ),
            (
                LoadOptions {
                    nat_half_open_s: 1000,
                    ..d
                },
                "longer than --nat-tcp-idle",
            ),
            (
                LoadOptions {
                    nat_half_share_pct: 101,
                    ..d
                },
                "--nat-half-open-share 101",
            ),
        ] {
            let e = bad.validate().expect_err(what).to_string();
            assert!(e.contains(what) && !e.contains('\n'), "{e}");
        }
    }
}
