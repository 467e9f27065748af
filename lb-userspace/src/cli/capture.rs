//! `lb capture`: asks the agent for a capture and writes it as pcapng, to a file (mode 0600,
//! the caller's own) or to standard output for `tcpdump -r -` or Wireshark.
use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb_userspace::{
    api::client::Client,
    capture::{
        pcapng::Writer,
        wire::{
            self, CaptureRequest, End, KIND_END, KIND_PROGRESS, KIND_RECORD, KIND_START, Progress,
            Start,
        },
    },
};

/// Capture what the XDP program saw and decided, as pcapng.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  lb capture -w - --vip 10.0.0.10:80/tcp -c 100 | tcpdump -nr -\n  lb capture -w drops.pcapng --verdict dropped --reason dropped_malformed --duration 30s\n  lb capture -w both.pcapng --both -c 20   # each forwarded frame as it arrived and as it left"
)]
pub struct CaptureArgs {
    /// Where to write pcapng: a file (created with mode 0600) or `-` for standard output.
    #[arg(short = 'w', long = "write", value_name = "FILE|-")]
    pub write: PathBuf,
    /// Stop after this many packets.
    #[arg(short = 'c', long = "count")]
    pub count: Option<u64>,
    /// Stop after this long (e.g. 500ms, 10s, 1m; at most 110s).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Bytes of each frame kept (at most 256).
    #[arg(long, default_value_t = lb_common::CAPTURE_DEFAULT_SNAP)]
    pub snaplen: u32,
    /// Only packets for this VIP, e.g. 10.0.0.10:80/tcp.
    #[arg(long)]
    pub vip: Option<String>,
    /// Only packets sent to this backend (add --vip when it serves several).
    #[arg(long)]
    pub backend: Option<String>,
    /// Only packets with this verdict.
    #[arg(long, value_parser = ["forwarded", "passed", "dropped"])]
    pub verdict: Option<String>,
    /// Only packets counted under this reason (a row of `lb stats`, e.g. dropped_malformed).
    #[arg(long)]
    pub reason: Option<String>,
    /// Keep one matching packet in N: `--sample 1/100` (or `100`).
    #[arg(long, value_parser = parse_sample)]
    pub sample: Option<u32>,
    /// Also write each forwarded frame as it left (rewritten, encapsulated, translated).
    #[arg(long)]
    pub both: bool,
    /// At most this many packets a second reach the capture; the rest are counted as missed.
    #[arg(long, default_value_t = lb_userspace::capture::DEFAULT_MAX_RATE)]
    pub max_rate: u32,
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration `{s}`: e.g. 500ms, 10s, 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("invalid duration `{s}`: e.g. 500ms, 10s, 2m")),
    };
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(d)
}

pub(super) fn parse_sample(s: &str) -> Result<u32, String> {
    let n = s.strip_prefix("1/").unwrap_or(s);
    match n.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("invalid sample `{s}`: give 1/N with N >= 1")),
    }
}

/// The output: standard output or a new file of the caller's, mode 0600.
fn open_output(path: &PathBuf) -> anyhow::Result<Box<dyn Write>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdout().lock()));
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // An existing file keeps its mode through `open`: make it 0600 too.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting {} to mode 0600", path.display()))?;
    Ok(Box::new(BufWriter::new(f)))
}

pub async fn run(client: &Client, a: CaptureArgs) -> anyhow::Result<()> {
    if a.snaplen == 0 || a.snaplen > lb_common::CAPTURE_MAX_SNAP {
        bail!(
            "--snaplen {}: give 1 to {} bytes",
            a.snaplen,
            lb_common::CAPTURE_MAX_SNAP
        );
    }
    let max = lb_userspace::api::capture::MAX_DURATION;
    if a.duration > max {
        bail!("--duration {:?}: at most {} s", a.duration, max.as_secs());
    }
    if a.max_rate == 0 {
        bail!("--max-rate must be at least 1 packet a second");
    }
    let req = CaptureRequest {
        count: a.count.unwrap_or(0),
        duration_ms: a.duration.as_millis() as u64,
        snaplen: a.snaplen,
        vip: a.vip,
        backend: a.backend,
        verdict: a.verdict,
        reason: a.reason,
        sample: a.sample.unwrap_or(1),
        both: a.both,
        max_rate: a.max_rate,
    };
    // Asked before the file is made: a refused capture leaves no empty file.
    let mut stream = client.capture(&req).await?;
    write_capture(&a.write, "lb capture", async || Ok(stream.next().await?)).await
}

/// Writes a capture's messages (`wire`: a start, records, progress, an end) as pcapng to
/// `write` until its end or Ctrl-C, then prints the one line of counts as `who`. The agent's
/// stream (`lb capture`) and the decap capture's own session (`lb decap --capture`) alike.
pub(super) async fn write_capture(
    write: &PathBuf,
    who: &str,
    mut next_message: impl AsyncFnMut() -> anyhow::Result<Option<(u8, Vec<u8>)>>,
) -> anyhow::Result<()> {
    let out = open_output(write)?;
    let mut writer: Option<Writer<Box<dyn Write>>> = None;
    let mut out = Some(out);
    let mut last = Progress::default();
    let mut packets = 0u64;
    let mut records = 0u64;
    let end: Option<End> = loop {
        // Ctrl-C ends the capture as the agent's end would: the file whole, the counts said.
        let next = tokio::select! {
            m = next_message() => m?,
            _ = tokio::signal::ctrl_c() => break Some(End {
                counts: last,
                sent: records,
                reason: "Ctrl-C".into(),
            }),
        };
        let Some((kind, payload)) = next else {
            break None;
        };
        match kind {
            KIND_START => {
                let start: Start =
                    serde_json::from_slice(&payload).context("the agent's capture start")?;
                let o = out.take().context("a second capture start")?;
                writer = Some(Writer::new(o, start).map_err(anyhow::Error::msg)?);
            }
            KIND_RECORD => {
                let w = writer.as_mut().context("a record before the start")?;
                let (h, data) = wire::parse_record(&payload).map_err(anyhow::Error::msg)?;
                packets += u64::from(h.direction == lb_common::CAPTURE_ARRIVED);
                records += 1;
                w.packet(&h, data).map_err(anyhow::Error::msg)?;
                w.flush().map_err(anyhow::Error::msg)?;
            }
            KIND_PROGRESS => {
                last = serde_json::from_slice(&payload).unwrap_or(last);
            }
            KIND_END => break Some(serde_json::from_slice(&payload).context("the capture's end")?),
            _ => {}
        }
    };
    if let Some(w) = writer.as_mut() {
        w.flush().map_err(anyhow::Error::msg)?;
    }
    match end {
        Some(e) => eprintln!(
            "{who}: {packets} packets captured ({} records), {} missed (over --max-rate or the ring full); ended by {}",
            e.sent, e.counts.missed, e.reason
        ),
        None => bail!(
            "{who}: the capture ended early after {packets} packets ({} missed so far)",
            last.missed
        ),
    }
    Ok(())
}
