//! The BGP sessions as the speaker (bird) sees them, read from its control socket: the same
//! text protocol `birdc` speaks (a greeting, one command per line, numbered reply lines, a
//! line `0000` at the end), so no subprocess and no parsing of a terminal program's output.
use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::Error;

/// Longest wait for the speaker's answer.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Most reply lines read (a speaker with thousands of protocols is not ours to list).
const MAX_LINES: usize = 10_000;

/// One BGP session of the speaker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The speaker's name of the session (the template names each after its peer).
    pub peer: String,
    /// `established`, or the BGP state the speaker reports (idle, connect, active, ...).
    pub state: String,
    pub up: bool,
}

/// Reads the BGP sessions from the bird control socket at `socket`.
pub async fn sessions(socket: &Path) -> Result<Vec<Session>, Error> {
    let what = format!("asking the BGP speaker on {}", socket.display());
    let lines = tokio::time::timeout(TIMEOUT, ask(socket, "show protocols"))
        .await
        .map_err(|_| Error::Unavailable(format!("{what}: no answer within {TIMEOUT:?}")))?
        .map_err(Error::io(what))?;
    Ok(parse_protocols(&normalize(lines)))
}

/// Continuation lines start with a space and belong to the code of the line above: each gets
/// that code, so every line carries one.
pub fn normalize(raw: Vec<String>) -> Vec<String> {
    let mut code = String::from("0000");
    raw.into_iter()
        .map(|l| match l.strip_prefix(' ') {
            Some(rest) => format!("{code}-{rest}"),
            None => {
                code = l.chars().take(4).collect();
                l
            }
        })
        .collect()
}

async fn ask(socket: &Path, command: &str) -> std::io::Result<Vec<String>> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut greeting = String::new();
    r.read_line(&mut greeting).await?;
    w.write_all(format!("{command}\n").as_bytes()).await?;
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 || lines.len() >= MAX_LINES {
            break;
        }
        let line = line.trim_end_matches('\n').to_string();
        let end = line.starts_with("0000") || line.starts_with('8') || line.starts_with('9');
        lines.push(line);
        if end {
            break;
        }
    }
    Ok(lines)
}

/// The BGP rows of a `show protocols` reply (`1002-NAME  BGP  ---  up  SINCE  Established`).
pub fn parse_protocols(lines: &[String]) -> Vec<Session> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("1002-")
                .or_else(|| l.strip_prefix("1002 "))?;
            let cols: Vec<&str> = rest.split_whitespace().collect();
            if cols.get(1) != Some(&"BGP") {
                return None;
            }
            let proto_state = cols.get(3).copied().unwrap_or("");
            // Columns: name, proto, table, state, since (one or two words), info.
            let info = cols
                .iter()
                .skip(4)
                .find(|c| c.chars().next().is_some_and(char::is_alphabetic))
                .copied()
                .unwrap_or(proto_state);
            let up = proto_state == "up" && info == "Established";
            Some(Session {
                peer: cols[0].to_string(),
                state: info.to_lowercase(),
                up,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bgp_rows_are_read_and_others_skipped() {
        let reply: Vec<String> = [
            "2002-Name       Proto      Table      State  Since         Info",
            "1002-device1    Device     ---        up     08:48:21.881  ",
            " bfd1       BFD        ---        up     08:48:21.881  ",
            " r1         BGP        ---        up     08:48:26.022  Established   ",
            " r2         BGP        ---        start  08:48:26.022  Active        Socket: Connection refused",
            "1002-r3         BGP        ---        start  2026-12-07 08:48:26  Idle",
            "0000 ",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = parse_protocols(&normalize(reply));
        assert_eq!(s.len(), 3, "{s:?}");
        assert!(s[0].up && s[0].state == "established");
        assert!(!s[1].up && s[1].state == "active");
        assert!(!s[2].up && s[2].state == "idle");
    }
}
