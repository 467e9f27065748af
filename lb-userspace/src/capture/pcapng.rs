//! The capture as pcapng (`pcap-file`'s writer): two interfaces, `arrived` (0) and `left`
//! (1), nanosecond timestamps, and each packet's verdict, reason, VIP and backend in its
//! comment, which Wireshark shows (`frame.comment`) and `tshark` can filter on.
use std::{borrow::Cow, io::Write, time::Duration};

use lb_common::{CAPTURE_ARRIVED, CAPTURE_NONE, CaptureHeader, DecapStat, Stat};
use pcap_file::{
    DataLink,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};

use super::wire::{Start, verdict_word};

/// Writes records as pcapng packets.
pub struct Writer<W: Write> {
    out: PcapNgWriter<W>,
    start: Start,
}

/// Inbound and outbound in an enhanced packet block's flags (`epb_flags`, bits 0-1).
const INBOUND: u32 = 1;
const OUTBOUND: u32 = 2;

impl<W: Write> Writer<W> {
    /// The section header and the two interfaces.
    pub fn new(out: W, start: Start) -> Result<Self, String> {
        let mut out = PcapNgWriter::new(out).map_err(|e| format!("writing pcapng: {e}"))?;
        for (name, what) in [
            ("arrived", "frames as they reached the XDP program"),
            ("left", "frames as the XDP program sent them on"),
        ] {
            let idb = InterfaceDescriptionBlock {
                linktype: DataLink::ETHERNET,
                snaplen: start.snaplen,
                options: vec![
                    InterfaceDescriptionOption::IfName(Cow::Borrowed(name)),
                    InterfaceDescriptionOption::IfDescription(Cow::Borrowed(what)),
                    // Nanoseconds: the writer stores the timestamp in them.
                    InterfaceDescriptionOption::IfTsResol(9),
                ],
            };
            out.write_pcapng_block(idb)
                .map_err(|e| format!("writing pcapng: {e}"))?;
        }
        Ok(Writer { out, start })
    }

    /// What a packet's comment says: verdict, reason, VIP, backend, direction.
    pub fn comment(&self, h: &CaptureHeader) -> String {
        let dir = if h.direction == CAPTURE_ARRIVED {
            "arrived"
        } else {
            "left"
        };
        if self.start.decap {
            let reason = DecapStat::ALL
                .get(h.stat as usize)
                .map_or("unknown", |s| s.name());
            return format!(
                "lb decap: {dir} verdict={} reason={reason} cpu={}",
                verdict_word(h.action),
                h.cpu
            );
        }
        let reason = Stat::ALL
            .get(h.stat as usize)
            .map_or("unknown", |s| s.name());
        let name = |id: u32, names: &std::collections::BTreeMap<u32, String>| {
            if id == CAPTURE_NONE {
                "-".to_string()
            } else {
                names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| format!("id {id}"))
            }
        };
        format!(
            "lb: {dir} verdict={} reason={} vip={} backend={} cpu={}",
            verdict_word(h.action),
            reason,
            name(h.vip, &self.start.vips),
            name(h.backend, &self.start.backends),
            h.cpu
        )
    }

    /// One record as a packet.
    pub fn packet(&mut self, h: &CaptureHeader, data: &[u8]) -> Result<(), String> {
        let unix = (i128::from(h.ts_ns) + self.start.mono_to_unix_ns).max(0) as u64;
        let arrived = h.direction == CAPTURE_ARRIVED;
        let epb = EnhancedPacketBlock {
            interface_id: if arrived { 0 } else { 1 },
            timestamp: Duration::from_nanos(unix),
            original_len: h.orig_len,
            data: Cow::Borrowed(data),
            options: vec![
                EnhancedPacketOption::Comment(Cow::Owned(self.comment(h))),
                EnhancedPacketOption::Flags(if arrived { INBOUND } else { OUTBOUND }),
            ],
        };
        self.out
            .write_pcapng_block(epb)
            .map_err(|e| format!("writing pcapng: {e}"))?;
        Ok(())
    }

    /// Pushes what was written to the file or pipe.
    pub fn flush(&mut self) -> Result<(), String> {
        self.out
            .get_mut()
            .flush()
            .map_err(|e| format!("writing pcapng: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_reads_back_with_its_comment() {
        let mut start = Start {
            snaplen: 128,
            ..Default::default()
        };
        start.vips.insert(0, "10.0.0.10:80/tcp".into());
        start.backends.insert(2, "10.0.1.3".into());
        let mut w = Writer::new(Vec::new(), start).unwrap();
        let h = CaptureHeader {
            ts_ns: 5,
            orig_len: 60,
            cap_len: 4,
            stat: Stat::Forwarded as u32,
            action: 3,
            vip: 0,
            backend: 2,
            direction: lb_common::CAPTURE_LEFT,
            cpu: 1,
        };
        w.packet(&h, &[1, 2, 3, 4]).unwrap();
        let bytes = w.out.into_inner();
        let mut r = pcap_file::pcapng::PcapNgReader::new(&bytes[..]).unwrap();
        let mut packets = Vec::new();
        while let Some(b) = r.next_block() {
            if let pcap_file::pcapng::Block::EnhancedPacket(p) = b.unwrap() {
                packets.push(p.into_owned());
            }
        }
        assert_eq!(packets.len(), 1);
        let p = &packets[0];
        assert_eq!(
            (p.interface_id, p.original_len, &p.data[..]),
            (1, 60, &[1u8, 2, 3, 4][..])
        );
        assert!(p.options.iter().any(|o| matches!(o,
            EnhancedPacketOption::Comment(c)
                if c == "lb: left verdict=forwarded reason=forwarded vip=10.0.0.10:80/tcp backend=10.0.1.3 cpu=1")));
    }
}
