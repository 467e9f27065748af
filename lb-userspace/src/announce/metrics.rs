//! The announcement on `/metrics`: `lb_vip_announced{vip}` (1 announced, also while
//! draining; 0 withdrawn), `lb_vip_announce_draining{vip}`, `lb_bgp_session_up{peer}` (as the
//! speaker reports it) and the table's route changes.
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::announce::AnnounceView;

type Labels = Vec<(String, String)>;

pub fn register(reg: &mut Registry, v: &AnnounceView) {
    let announced = Family::<Labels, Gauge>::default();
    reg.register(
        "vip_announced",
        "1 while this node announces the VIP's address by BGP (draining included), 0 while withdrawn",
        announced.clone(),
    );
    let draining = Family::<Labels, Gauge>::default();
    reg.register(
        "vip_announce_draining",
        "1 while the VIP is announced with the GRACEFUL_SHUTDOWN community (node drain)",
        draining.clone(),
    );
    for a in &v.vips {
        let l = vec![("vip".to_string(), a.vip.to_string())];
        announced
            .get_or_create(&l)
            .set(i64::from(a.state != "withdrawn"));
        draining
            .get_or_create(&l)
            .set(i64::from(a.state == "draining"));
    }
    let up = Family::<Labels, Gauge>::default();
    reg.register(
        "bgp_session_up",
        "1 while the speaker reports the BGP session established",
        up.clone(),
    );
    for s in &v.sessions {
        up.get_or_create(&vec![("peer".to_string(), s.peer.clone())])
            .set(i64::from(s.up));
    }
    let speaker = Gauge::<i64>::default();
    reg.register(
        "bgp_speaker_answers",
        "1 while the speaker's control socket answers (0: sessions unknown)",
        speaker.clone(),
    );
    speaker.set(i64::from(v.speaker_error.is_none()));
    let changes = Counter::<u64>::default();
    reg.register(
        "announce_route_changes",
        "Routes added to or deleted from the announce table",
        changes.clone(),
    );
    changes.inc_by(v.route_changes_total);
}
