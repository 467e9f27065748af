//! `lb upgrade --check`, and how `lb stats` names the migration that ran.
use std::path::Path;

use lb_userspace::{Error, protocol::MigrationView};

pub fn run(check: bool, iface: &str, bpffs: &Path) -> anyhow::Result<()> {
    if !check {
        return Err(Error::Invalid(
            "`lb upgrade` changes nothing by itself: the upgrade is the new build's normal start on the same pins (`lb run`, or the service's restart); `lb upgrade --check --iface IFACE` says what it would do".into(),
        )
        .into());
    }
    print!(
        "{}",
        lb_userspace::dataplane::migrate::check_pins(bpffs, iface)?
    );
    Ok(())
}

/// One line for `lb stats`.
pub fn migration_line(m: &MigrationView) -> String {
    let at = i64::try_from(m.at_unix)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| "an unknown time".into(), |t| t.to_string());
    format!(
        "pinned maps migrated from map ABI {} to {} at {at}: {} maps made new, {} entries copied in {} ms",
        m.from,
        m.to,
        m.maps,
        m.entries,
        m.took_us.div_ceil(1000)
    )
}
