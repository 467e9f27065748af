//! Publishing a VIP's slot table atomically: the kernel reads either the old or the new table,
//! never a mix. The inactive generation is filled first; then the VIP's state, which names
//! the live generation, is rewritten. A new VIP's key is bound last, so its first packet
//! already finds a complete table.
use std::collections::BTreeSet;

use lb_common::{Previous, Slot, VIP_F_PRESENT, VipInfo, VipKey};

use crate::{Dataplane, Error, agent::reconcile::VipParams};

impl Dataplane {
    /// Makes `slots` (M backend ids, or empty for "no backend") the live table of VIP `key`
    /// under id `id` with `params`, with `previous` (M slots' previous backend ids during a
    /// second-chance window, or empty), creating the VIP if needed. Returns its state.
    pub fn publish_vip(
        &mut self,
        key: &VipKey,
        id: u32,
        params: VipParams,
        slots: &[u32],
        previous: &[Previous],
    ) -> Result<VipInfo, Error> {
        let old = self.vips.info(id)?;
        let bound = self.vips.id_of(key)?;
        // The reconciler unbinds a key before giving it another id, and owns every id: an id
        // marked present without a key (a publish cut short) is simply taken over.
        if let Some(other) = bound.filter(|o| *o != id) {
            return Err(Error::Kernel(format!(
                "VIP is already loaded with id {other}, not {id}"
            )));
        }
        let (active_gen, generation) = match bound {
            Some(_) => (1 - (old.active_gen & 1), old.generation),
            None => (0, old.generation.wrapping_add(1)),
        };
        // An empty table is written as zeros (backend id 0 is never present): a packet that
        // reads the new generation early still finds no backend, never a stale one.
        let m = self.slots.ring_size() as usize;
        let table: Vec<Slot> = (0..m)
            .map(|s| Slot {
                backend: slots.get(s).copied().unwrap_or(0),
                previous: previous.get(s).copied().unwrap_or_default(),
            })
            .collect();
        if !slots.is_empty() && slots.len() != m {
            return Err(Error::Invalid(format!(
                "slot table has {} entries, the data plane was loaded with {m}",
                slots.len()
            )));
        }
        self.slots.write(id, active_gen, &table)?;
        // A new VIP gets the same table in its other generation too, so the next publish
        // only writes the slots that differ.
        if bound.is_none() {
            self.slots.write(id, 1 - active_gen, &table)?;
        }
        let backend_count = slots.iter().collect::<BTreeSet<_>>().len() as u32;
        let info = VipInfo {
            flags: params.flags | VIP_F_PRESENT,
            active_gen,
            backend_count,
            generation,
            udp_idle_s: params.udp_idle_s,
        };
        self.vips.set_info(id, &info)?;
        if bound.is_none() {
            self.vips.bind(key, id)?;
        }
        Ok(info)
    }

    /// Removes VIP `key`; its traffic passes to the kernel from now on and its flows are
    /// no longer used.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), Error> {
        if let Some(id) = self.vips.id_of(key)? {
            self.vips.unbind(key)?;
            let old = self.vips.info(id)?;
            self.vips.set_info(
                id,
                &VipInfo {
                    generation: old.generation,
                    ..VipInfo::default()
                },
            )?;
            self.slots.forget(id);
        }
        Ok(())
    }
}
