//! Helpers for privileged end-to-end tests and the demo: throw-away network namespaces,
//! veth links and child processes, each removed by a guard on `Drop` (also when a test fails).
//!
//! Names are unique per process and call so tests can run in parallel. Everything is driven
//! through iproute2's `ip`, the same commands an operator would type.
pub mod agent;
pub mod bgp;
pub mod etcd;
pub mod expect;
pub mod fleet;
pub mod frames;
pub mod insns;
pub mod jumbo;
pub mod l2fleet;
pub mod net;
/// The previous release's `lb`, built from git for the upgrade test.
pub mod prev;
pub mod proc;
pub mod raw;
pub mod routed;
pub mod second_chance;
pub mod topo;
pub mod traffic;
pub mod wait;
pub mod world;

pub use agent::AgentDir;
pub use net::{Netns, TwoHosts, VethPair, unique_name};
pub use proc::{ChildGuard, lb_binary};
pub use wait::wait_until;

#[cfg(test)]
mod map_declarations {
    /// The compiled object holds exactly the maps `lb_common::LB_MAPS` describes, each declared
    /// as described (kind, key and value sizes, flags, declared capacity): the kernel's
    /// declarations, the agent's sizing and its pins check come from one description.
    #[test]
    fn the_objects_maps_are_the_described_ones() {
        let obj = aya_obj::Object::parse(lb_userspace::EBPF_OBJECT).expect("the object parses");
        let mut seen = Vec::new();
        for (name, map) in &obj.maps {
            // Globals (`LB_CONFIG` and the like) live in sections the loader makes maps of.
            if name.starts_with('.') {
                continue;
            }
            // Benchmark harnesses' scratch maps are not the product's.
            if name.starts_with("BENCH") {
                continue;
            }
            let spec = lb_common::lb_map(name)
                .unwrap_or_else(|| panic!("map {name} is not described in lb_common::LB_MAPS"));
            let declared = (
                map.map_type(),
                map.key_size(),
                map.value_size(),
                map.max_entries(),
                map.map_flags(),
            );
            let described = (
                spec.kind as u32,
                spec.key_size,
                spec.value_size,
                spec.capacity.declared(),
                spec.flags,
            );
            assert_eq!(
                declared, described,
                "{name}: declared (type, key, value, entries, flags) vs its description"
            );
            seen.push(name.as_str());
        }
        for m in lb_common::LB_MAPS {
            assert!(
                seen.contains(&m.name),
                "{} is described but not declared",
                m.name
            );
        }
    }
}
