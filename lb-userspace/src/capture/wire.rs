//! What `lb capture` and the agent say to each other: the request (JSON, `POST /v1/capture`)
//! and the streamed answer, a sequence of messages `[kind: u8][len: u32 LE][payload]`:
//! one [`Start`] (JSON), then records (a `lb_common::CaptureHeader` as the kernel wrote it,
//! then `cap_len` bytes of the frame) and [`Progress`] ticks (JSON), and one [`End`] (JSON).
use std::collections::BTreeMap;

use lb_common::{CAPTURE_V_DROPPED, CAPTURE_V_FORWARDED, CAPTURE_V_PASSED, CaptureHeader};
use serde::{Deserialize, Serialize};

pub const KIND_START: u8 = b'S';
pub const KIND_RECORD: u8 = b'R';
pub const KIND_PROGRESS: u8 = b'P';
pub const KIND_END: u8 = b'E';

/// Longest message the client accepts (a record is 296 bytes; JSON messages name VIPs and
/// backends).
pub const MAX_MESSAGE: usize = 1 << 20;

/// `POST /v1/capture`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// Stop after this many packets (0: no limit).
    pub count: u64,
    /// Stop after this long (milliseconds).
    pub duration_ms: u64,
    pub snaplen: u32,
    pub vip: Option<String>,
    pub backend: Option<String>,
    /// `forwarded`, `passed` or `dropped`.
    pub verdict: Option<String>,
    /// A counter reason (`lb stats`' rows).
    pub reason: Option<String>,
    /// Record one matching packet in N.
    pub sample: u32,
    /// Also the frame as it left.
    pub both: bool,
    /// Packets per second reaching the agent, at most (0: the agent's default).
    pub max_rate: u32,
}

/// The first message: what the ids in the records name, and the clock.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Start {
    pub vips: BTreeMap<u32, String>,
    pub backends: BTreeMap<u32, String>,
    /// Add to a record's `ts_ns` (monotonic) for nanoseconds since the Unix epoch.
    pub mono_to_unix_ns: i128,
    pub snaplen: u32,
    /// The per-second limit in force.
    pub max_rate: u32,
    /// The records are the backend's decap program's (`lb decap --capture`): reasons are
    /// `DecapStat`s, and there is no VIP or backend.
    #[serde(default)]
    pub decap: bool,
}

/// Sent every quarter second: the kernel's counters of this capture so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Records the program output to the ring.
    pub emitted: u64,
    /// Matching packets not recorded (over the rate, or the ring full).
    pub missed: u64,
    /// Matching packets `--sample` left out.
    #[serde(default)]
    pub sampled_out: u64,
}

/// The last message.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct End {
    pub counts: Progress,
    /// Records the agent sent to the client.
    pub sent: u64,
    /// Why it ended: `count`, `duration` or `client gone` (never seen by that client).
    pub reason: String,
}

/// `GET /v1/capture`: whether a capture runs and the kernel's counters of the last one.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CaptureStatus {
    pub running: bool,
    pub counts: Progress,
}

/// The `CAPTURE_V_*` bits of a `--verdict` word.
pub fn verdict_bits(word: &str) -> Option<u32> {
    Some(match word {
        "forwarded" => CAPTURE_V_FORWARDED,
        "passed" => CAPTURE_V_PASSED,
        "dropped" => CAPTURE_V_DROPPED,
        _ => return None,
    })
}

/// The word of an XDP action's verdict.
pub fn verdict_word(action: u32) -> &'static str {
    match lb_common::verdict_bit(action) {
        CAPTURE_V_FORWARDED => "forwarded",
        CAPTURE_V_PASSED => "passed",
        _ => "dropped",
    }
}

/// One framed message.
pub fn message(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(5 + payload.len());
    m.push(kind);
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Takes the next whole message off the front of `buf`, if it holds one.
pub fn next_message(buf: &mut Vec<u8>) -> Result<Option<(u8, Vec<u8>)>, String> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(format!("a message of {len} bytes from the agent: too long"));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let kind = buf[0];
    let payload = buf[5..5 + len].to_vec();
    buf.drain(..5 + len);
    Ok(Some((kind, payload)))
}

/// A record's header and frame bytes.
pub fn parse_record(payload: &[u8]) -> Result<(CaptureHeader, &[u8]), String> {
    const H: usize = size_of::<CaptureHeader>();
    if payload.len() < H {
        return Err(format!("a record of {} bytes: too short", payload.len()));
    }
    let mut h = CaptureHeader::default();
    // SAFETY: `CaptureHeader` is plain `#[repr(C)]` integers; any bytes are a value.
    unsafe {
        std::ptr::copy_nonoverlapping(payload.as_ptr(), (&raw mut h).cast::<u8>(), H);
    }
    let data = &payload[H..];
    if data.len() != h.cap_len as usize {
        return Err(format!(
            "a record says {} bytes and holds {}",
            h.cap_len,
            data.len()
        ));
    }
    Ok((h, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_apart_as_they_were_framed() {
        let mut buf = message(KIND_START, b"{}");
        buf.extend(message(KIND_RECORD, &[7; 50]));
        buf.extend_from_slice(&[KIND_END, 9]);
        assert_eq!(
            next_message(&mut buf).unwrap(),
            Some((KIND_START, b"{}".to_vec()))
        );
        assert_eq!(
            next_message(&mut buf).unwrap(),
            Some((KIND_RECORD, vec![7; 50]))
        );
        // An incomplete one waits for more bytes.
        assert_eq!(next_message(&mut buf).unwrap(), None);
        let mut huge = vec![KIND_RECORD];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(next_message(&mut huge).is_err());
    }

    #[test]
    fn a_record_must_hold_what_it_says() {
        let h = CaptureHeader {
            cap_len: 3,
            ..Default::default()
        };
        let mut p = vec![0u8; size_of::<CaptureHeader>()];
        // SAFETY: plain integers, as in `parse_record`.
        unsafe { std::ptr::copy_nonoverlapping((&raw const h).cast::<u8>(), p.as_mut_ptr(), 40) };
        p.extend_from_slice(&[1, 2, 3]);
        let (back, data) = parse_record(&p).unwrap();
        assert_eq!((back.cap_len, data), (3, &[1u8, 2, 3][..]));
        assert!(parse_record(&p[..42]).is_err());
    }
}
