//! Each command as a pure edit of the desired state: checks that what it names exists (or
//! does not), and returns the new desired state. The agent validates the result as a whole.
use crate::{
    Error,
    model::{BackendAddr, BackendSpec, DesiredState, VipAddr, VipSpec, validate_backend},
    protocol::Command,
};

fn vip<'a>(d: &'a mut DesiredState, vip: &VipAddr) -> Result<&'a mut VipSpec, Error> {
    d.vips
        .get_mut(vip)
        .ok_or_else(|| Error::NotFound(format!("unknown VIP {vip}: see `lb vip list`")))
}

fn backend<'a>(
    d: &'a mut DesiredState,
    v: &VipAddr,
    addr: &BackendAddr,
) -> Result<&'a mut BackendSpec, Error> {
    vip(d, v)?.backends.get_mut(addr).ok_or_else(|| {
        Error::NotFound(format!(
            "unknown backend {addr} in VIP {v}: see `lb backend list {v}`"
        ))
    })
}

/// The desired state after `cmd`, or `None` for commands that are not edits.
pub fn edit(current: &DesiredState, cmd: &Command) -> Result<Option<DesiredState>, Error> {
    let mut d = current.clone();
    match cmd {
        Command::AddVip {
            vip: v,
            source_hash,
            udp_idle_s,
            forward,
            second_chance_s,
            health,
            allow_sources,
            deny_sources,
            new_flow_limit,
            source_limit,
            announce_min_serving,
        } => {
            crate::model::validate_udp_idle(v, *udp_idle_s).map_err(Error::Invalid)?;
            if let Some(s) = second_chance_s {
                crate::model::second_chance_needs_gue(v, *forward).map_err(Error::Invalid)?;
                crate::model::validate_second_chance(v, *s).map_err(Error::Invalid)?;
            }
            if d.vips.contains_key(v) {
                return Err(Error::Conflict(format!(
                    "VIP {v} already exists: remove it first or use `lb apply`"
                )));
            }
            if let Some(h) = health {
                h.validate(v).map_err(Error::Invalid)?;
            }
            d.vips.insert(
                *v,
                VipSpec {
                    source_hash: *source_hash,
                    udp_idle_s: *udp_idle_s,
                    forward: *forward,
                    second_chance_s: second_chance_s
                        .unwrap_or(crate::model::DEFAULT_SECOND_CHANCE_S),
                    health: health.clone(),
                    backends: Default::default(),
                    allow_sources: allow_sources.iter().copied().collect(),
                    deny_sources: deny_sources.iter().copied().collect(),
                    new_flow_limit: *new_flow_limit,
                    source_limit: *source_limit,
                    announce_min_serving: *announce_min_serving,
                },
            );
        }
        Command::RemoveVip { vip: v } => {
            vip(&mut d, v)?;
            d.vips.remove(v);
        }
        Command::AddBackend {
            vip: v,
            address,
            weight,
            mac,
        } => {
            let spec = BackendSpec {
                weight: *weight,
                mac: *mac,
                drained: false,
            };
            let s = vip(&mut d, v)?;
            if s.backends.contains_key(address) {
                return Err(Error::Conflict(format!(
                    "backend {address} already exists in VIP {v}: use `lb backend weight` to change it"
                )));
            }
            validate_backend(v, s.forward, address, &spec).map_err(Error::Invalid)?;
            s.backends.insert(*address, spec);
        }
        Command::RemoveBackend { vip: v, address } => {
            backend(&mut d, v, address)?;
            vip(&mut d, v)?.backends.remove(address);
        }
        Command::SetWeight {
            vip: v,
            address,
            weight,
        } => {
            let forward = vip(&mut d, v)?.forward;
            let b = backend(&mut d, v, address)?;
            b.weight = *weight;
            validate_backend(v, forward, address, b).map_err(Error::Invalid)?;
        }
        Command::Drain {
            vip: v,
            address,
            drained,
        } => backend(&mut d, v, address)?.drained = *drained,
        Command::Apply { state, .. } => {
            state.validate().map_err(Error::Invalid)?;
            // The node-wide deny list is `lb deny`'s: a config file does not carry it.
            let deny = std::mem::take(&mut d.deny);
            d = state.clone();
            d.deny = deny;
        }
        Command::DenyAdd { .. } | Command::DenyRemove { .. } => {
            let changes = deny_delta(&d.deny, cmd)?;
            crate::agent::deny_file::apply(&mut d.deny, &changes);
        }
        Command::Reconcile => return Ok(None),
    }
    Ok(Some(d))
}

/// The change `lb deny add|remove` (`cmd`) makes to the node's deny list `list`: checked
/// against it and worked out from the prefixes given, so its cost follows the command, not
/// the list (a list of a million is neither copied nor walked). At most one change; none
/// when every prefix is already on the list with the same end. Other commands: none.
pub fn deny_delta(
    list: &crate::agent::deny_file::DenyList,
    cmd: &Command,
) -> Result<Vec<crate::agent::deny_file::DenyChange>, Error> {
    use crate::agent::deny_file::DenyChange;
    // Each prefix once: the tries refuse to delete a key twice in one batch.
    let unique = |prefixes: &[crate::model::Prefix]| {
        let mut v = prefixes.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    match cmd {
        Command::DenyAdd {
            prefixes,
            expires_s,
        } => {
            if prefixes.is_empty() {
                return Err(Error::Invalid(
                    "lb deny add: give at least one prefix".into(),
                ));
            }
            let end = match expires_s {
                Some(0) => {
                    return Err(Error::Invalid(
                        "lb deny add: --expires must be at least 1 second".into(),
                    ));
                }
                Some(s) => crate::agent::guard::unix_now_s().saturating_add(*s),
                None => 0,
            };
            let mut new = unique(prefixes);
            new.retain(|p| list.get(p) != Some(&end));
            Ok(match new.is_empty() {
                true => Vec::new(),
                false => vec![DenyChange::Add { end, prefixes: new }],
            })
        }
        Command::DenyRemove { prefixes } => {
            if let Some(p) = prefixes.iter().find(|p| !list.contains_key(p)) {
                return Err(Error::NotFound(format!(
                    "{p} is not on the deny list: see `lb deny list`"
                )));
            }
            Ok(match prefixes.is_empty() {
                true => Vec::new(),
                false => vec![DenyChange::Remove {
                    prefixes: unique(prefixes),
                }],
            })
        }
        _ => Ok(Vec::new()),
    }
}
