//! Publishing a VIP's slot table atomically: the kernel reads either the old or the new table,
//! never a mix. The inactive generation is filled first; then the VIP entry, which names the
//! live generation, is replaced as a whole.
use std::collections::BTreeSet;

use lb_common::{VipInfo, VipKey};

use crate::{Dataplane, Error};

impl Dataplane {
    /// Makes `slots` (M backend ids, or empty for "no backend") the live table of VIP `key`
    /// with id `id` and `flags`, creating the VIP if needed. Returns the new VIP entry.
    pub fn publish_vip(
        &mut self,
        key: &VipKey,
        id: u32,
        flags: u32,
        slots: &[u32],
    ) -> Result<VipInfo, Error> {
        let current = self.vips.get(key)?;
        let generation = match current {
            Some(v) if v.id == id => 1 - (v.active_gen & 1),
            Some(v) => {
                return Err(Error::Invalid(format!(
                    "VIP is already loaded with id {}, not {id}",
                    v.id
                )));
            }
            None => 0,
        };
        self.slots.write(id, generation, slots)?;
        let backend_count = slots.iter().collect::<BTreeSet<_>>().len() as u32;
        let info = VipInfo {
            id,
            flags,
            active_gen: generation,
            backend_count,
        };
        self.vips.put(key, &info)?;
        Ok(info)
    }

    /// Removes VIP `key`; its traffic passes to the kernel from now on.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), Error> {
        if let Some(v) = self.vips.get(key)? {
            self.vips.remove(key)?;
            self.slots.forget(v.id);
        }
        Ok(())
    }
}
