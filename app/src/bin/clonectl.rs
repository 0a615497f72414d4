//! `clonectl`: watch clone bdevs hydrate.
//!
//! Talks JSON-RPC to `clone_tgt`'s socket itself (`bdev_clone_get_bdevs`,
//! rpc-contract.md §2.7) and shows a table of clones, or with `--watch` live
//! progress until every watched clone is hydrated or failed. On a terminal
//! the progress is drawn as bars; otherwise (pipes, CI logs) it is one plain
//! line per clone per interval, with no escape codes.
//!
//! Exit status: 0 all well; 1 the target could not be asked (socket missing,
//! RPC error such as an unknown name; the RPC's error text is printed);
//! 2 bad arguments; 3 a clone is failed (or its metadata went read-only);
//! 4 a clone's hydration is paused by errors (`paused_reason`
//! `source_errors` or `dest_errors`: it resumes by itself when the base
//! works again). 3 wins over 4.
//!
//! Names are shown as the target has them, with control characters and
//! backslashes escaped (`\u{1b}`, `\n`, `\\`), however long.

use std::io::{self, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bdev_clone::{CloneState, CloneStatus, MetadataMode, Named, PausedReason};
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::{json, Value};

const EXIT_ERROR: u8 = 1;
const EXIT_FAILED_CLONE: u8 = 3;
const EXIT_PAUSED_BY_ERRORS: u8 = 4;
/// How long one RPC may take before clonectl gives up on the target.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "clonectl",
    version,
    about = "Show clone bdevs and their hydration progress"
)]
struct Cli {
    /// clone_tgt's JSON-RPC Unix socket
    #[arg(short = 's', long = "socket", default_value = app::DEFAULT_RPC_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A table of clones: state, hydrated/total regions, percent, MiB/s, ETA,
    /// source released, errors
    Status {
        /// One clone bdev (default: all)
        name: Option<String>,
        /// Follow progress until every watched clone is hydrated and committed
        /// (its source released), or failed
        #[arg(short = 'w', long)]
        watch: bool,
        /// Seconds between refreshes with --watch
        #[arg(short = 'i', long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
        /// Print the status objects as JSON (bdev_clone_get_bdevs' result)
        #[arg(long, conflicts_with = "watch")]
        json: bool,
    },
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("not a number: {s:?}"))?;
    if !(0.05..=3600.0).contains(&v) {
        return Err(format!("{v} is out of range 0.05..=3600 seconds"));
    }
    Ok(v)
}

#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("cannot connect to {path}: {err} (is clone_tgt running? use -s SOCKET)")]
    Connect { path: String, err: io::Error },
    #[error("{method}: {err}")]
    Io {
        method: &'static str,
        err: io::Error,
    },
    #[error("{method}: the target closed the connection")]
    Closed { method: &'static str },
    #[error("{method}: bad reply from the target: {why}")]
    BadReply { method: &'static str, why: String },
    #[error("{method}: {message} (JSON-RPC error {code})")]
    Rpc {
        method: &'static str,
        code: i64,
        message: String,
    },
}

/// One JSON-RPC connection; replies are read as a stream of JSON values, as
/// SPDK's server sends them (no delimiters).
struct Client {
    stream: serde_json::StreamDeserializer<'static, serde_json::de::IoRead<UnixStream>, Value>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    fn connect(path: &PathBuf) -> Result<Self, CtlError> {
        let connect_err = |err| CtlError::Connect {
            path: path.display().to_string(),
            err,
        };
        let sock = UnixStream::connect(path).map_err(connect_err)?;
        sock.set_read_timeout(Some(RPC_TIMEOUT))
            .map_err(connect_err)?;
        let writer = sock.try_clone().map_err(connect_err)?;
        Ok(Self {
            stream: serde_json::Deserializer::from_reader(sock).into_iter(),
            writer,
            next_id: 1,
        })
    }

    fn call(&mut self, method: &'static str, params: Option<Value>) -> Result<Value, CtlError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if let Some(p) = params {
            req["params"] = p;
        }
        let bytes = serde_json::to_vec(&req).expect("a JSON value serializes");
        self.writer
            .write_all(&bytes)
            .map_err(|err| CtlError::Io { method, err })?;
        let reply = match self.stream.next() {
            None => return Err(CtlError::Closed { method }),
            Some(Err(e)) if e.is_io() => {
                let err = io::Error::from(e);
                let err = if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    io::Error::new(
                        err.kind(),
                        format!("no reply within {} s", RPC_TIMEOUT.as_secs()),
                    )
                } else {
                    err
                };
                return Err(CtlError::Io { method, err });
            }
            Some(Err(e)) => {
                return Err(CtlError::BadReply {
                    method,
                    why: e.to_string(),
                })
            }
            Some(Ok(v)) => v,
        };
        if reply.get("id") != Some(&json!(id)) {
            return Err(CtlError::BadReply {
                method,
                why: format!("reply to another request: {reply}"),
            });
        }
        if let Some(err) = reply.get("error") {
            return Err(CtlError::Rpc {
                method,
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_string(),
            });
        }
        reply
            .get("result")
            .cloned()
            .ok_or_else(|| CtlError::BadReply {
                method,
                why: format!("neither result nor error: {reply}"),
            })
    }

    fn clones(&mut self, name: Option<&str>) -> Result<Vec<Status>, CtlError> {
        const METHOD: &str = "bdev_clone_get_bdevs";
        let params = name.map(|n| json!({ "name": n }));
        let result = self.call(METHOD, params)?;
        let arr = result.as_array().ok_or_else(|| CtlError::BadReply {
            method: METHOD,
            why: format!("expected an array, got {result}"),
        })?;
        arr.iter()
            .map(|v| {
                Status::from_json(v).map_err(|why| CtlError::BadReply {
                    method: METHOD,
                    why,
                })
            })
            .collect()
    }
}

/// A clone's status object: typed as the target builds it, and as
/// received (what `--json` prints, with any field this clonectl does not
/// know).
#[derive(Debug, Clone)]
struct Status {
    st: CloneStatus,
    raw: Value,
}

/// `s` with control characters and backslashes escaped, so any name the
/// target accepts prints on one line and cannot drive the terminal.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Pad `cell` to `w` characters. By hand: `format!`'s width is limited to
/// u16 and panics beyond it (a 65,536-byte name).
fn pad(cell: &str, w: usize, right: bool) -> String {
    let fill = " ".repeat(w.saturating_sub(cell.chars().count()));
    if right {
        fill + cell
    } else {
        format!("{cell}{fill}")
    }
}

impl Status {
    fn from_json(v: &Value) -> Result<Self, String> {
        let st = CloneStatus::deserialize(v).map_err(|e| match v.get("name") {
            Some(Value::String(name)) => format!("{}: {e}", escape(name)),
            _ => e.to_string(),
        })?;
        Ok(Self { st, raw: v.clone() })
    }

    /// Failed, or metadata no longer writable (dm-clone's read-only/fail
    /// metadata modes): hydration cannot finish.
    fn is_failed(&self) -> bool {
        matches!(self.st.state, CloneState::Failed | CloneState::ReadOnly)
            || self.st.metadata.mode != MetadataMode::ReadWrite
    }

    /// Hydrated and committed (the clone then releases its source), or
    /// failed. A clone reports "hydrated" as soon as the last copy lands;
    /// the watch waits for the commit that makes it durable.
    fn is_done(&self) -> bool {
        (self.st.state == CloneState::Hydrated && self.st.source_released) || self.is_failed()
    }

    /// Paused by base errors: hydration waits for the base to work again.
    fn is_paused_by_errors(&self) -> bool {
        self.st.state == CloneState::Paused
            && matches!(
                self.st.paused_reason,
                Some(PausedReason::SourceErrors | PausedReason::DestErrors)
            )
    }

    /// The name, escaped for a terminal.
    fn shown_name(&self) -> String {
        escape(&self.st.settings.name)
    }

    /// The state, with the reason of a pause by errors.
    fn shown_state(&self) -> String {
        let state = self.st.state.name();
        match (self.st.paused_reason, self.is_paused_by_errors()) {
            (Some(r), true) => format!("{state}:{}", r.name()),
            _ => state.to_string(),
        }
    }

    fn rate(&self) -> String {
        format!(
            "{:.1}",
            self.st.progress.bytes_per_sec as f64 / (1 << 20) as f64
        )
    }

    fn eta(&self) -> String {
        if self.st.state == CloneState::Hydrated {
            return "-".into();
        }
        match self.st.progress.eta_sec {
            Some(s) if self.st.progress.bytes_per_sec > 0 => fmt_secs(s),
            _ => "?".into(),
        }
    }

    fn errors(&self) -> String {
        let e = &self.st.errors;
        if e.total() == 0 {
            "-".into()
        } else {
            format!(
                "src={} dst={} meta={}",
                e.source_read, e.dest_write, e.metadata
            )
        }
    }

    fn released(&self) -> &'static str {
        if self.st.source_released {
            "yes"
        } else {
            "no"
        }
    }

    /// One plain line for logs and pipes.
    fn line(&self) -> String {
        format!(
            "{}: {} {:.1}% ({}/{} regions) {} MiB/s ETA {} source released: {} errors: {}",
            self.shown_name(),
            self.shown_state(),
            self.st.progress.percent,
            self.st.hydrated_regions,
            self.st.num_regions,
            self.rate(),
            self.eta(),
            self.released(),
            self.errors()
        )
    }
}

fn fmt_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn print_table(clones: &[Status]) {
    if clones.is_empty() {
        println!("no clone bdevs");
        return;
    }
    let header = [
        "NAME",
        "STATE",
        "REGIONS",
        "DONE",
        "MiB/s",
        "ETA",
        "SRC-RELEASED",
        "ERRORS",
    ];
    let rows: Vec<[String; 8]> = clones
        .iter()
        .map(|c| {
            [
                c.shown_name(),
                c.shown_state(),
                format!("{}/{}", c.st.hydrated_regions, c.st.num_regions),
                format!("{:.1}%", c.st.progress.percent),
                c.rate(),
                c.eta(),
                c.released().to_string(),
                c.errors(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let fmt_row = |cells: &[&str]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(width).enumerate() {
            // Numbers right-aligned, text left-aligned; no trailing blanks.
            out.push_str(&pad(cell, w, matches!(i, 2..=5)));
            out.push_str("  ");
        }
        out.trim_end().to_string()
    };
    println!("{}", fmt_row(&header));
    for r in &rows {
        println!(
            "{}",
            fmt_row(&r.iter().map(String::as_str).collect::<Vec<_>>())
        );
    }
}

fn exit_for(clones: &[Status]) -> ExitCode {
    let failed: Vec<&Status> = clones.iter().filter(|c| c.is_failed()).collect();
    let paused: Vec<&Status> = clones
        .iter()
        .filter(|c| !c.is_failed() && c.is_paused_by_errors())
        .collect();
    for c in failed.iter().chain(&paused) {
        eprintln!(
            "clonectl: {} is {} (metadata {}, errors: {}){}",
            c.shown_name(),
            c.shown_state(),
            c.st.metadata.mode.name(),
            c.errors(),
            c.st.last_error
                .as_deref()
                .map(|e| format!(": {}", escape(e)))
                .unwrap_or_default()
        );
    }
    if !failed.is_empty() {
        ExitCode::from(EXIT_FAILED_CLONE)
    } else if !paused.is_empty() {
        ExitCode::from(EXIT_PAUSED_BY_ERRORS)
    } else {
        ExitCode::SUCCESS
    }
}

/// Follow progress until every clone of the first answer is done.
fn watch(
    client: &mut Client,
    name: Option<&str>,
    interval: Duration,
) -> Result<Vec<Status>, CtlError> {
    let mut clones = client.clones(name)?;
    if std::io::stdout().is_terminal() {
        watch_bars(client, name, interval, &mut clones)?;
    } else {
        loop {
            for c in &clones {
                println!("{}", c.line());
            }
            if clones.iter().all(Status::is_done) {
                break;
            }
            std::thread::sleep(interval);
            clones = refresh(client, name, &clones)?;
        }
    }
    Ok(clones)
}

/// The watched clones' new status. Asking by name keeps the set fixed: a
/// clone created meanwhile is not waited for; one deleted is an RPC error.
fn refresh(
    client: &mut Client,
    name: Option<&str>,
    prev: &[Status],
) -> Result<Vec<Status>, CtlError> {
    if name.is_some() {
        return client.clones(name);
    }
    prev.iter()
        .map(|c| {
            client
                .clones(Some(&c.st.settings.name))
                .map(|mut v| v.remove(0))
        })
        .collect()
}

fn watch_bars(
    client: &mut Client,
    name: Option<&str>,
    interval: Duration,
    clones: &mut Vec<Status>,
) -> Result<(), CtlError> {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
    let style = ProgressStyle::with_template("{prefix} [{bar:40}] {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let width = clones
        .iter()
        .map(|c| c.shown_name().chars().count())
        .max()
        .unwrap_or(0);
    let bars: Vec<ProgressBar> = clones
        .iter()
        .map(|c| {
            let bar = multi.add(ProgressBar::new(c.st.num_regions.max(1)));
            bar.set_style(style.clone());
            bar.set_prefix(pad(&c.shown_name(), width, false));
            bar
        })
        .collect();
    loop {
        for (c, bar) in clones.iter().zip(&bars) {
            bar.set_position(c.st.hydrated_regions);
            bar.set_message(format!(
                "{:5.1}% {:>8} MiB/s ETA {:>6} {}{}",
                c.st.progress.percent,
                c.rate(),
                c.eta(),
                c.shown_state(),
                if c.errors() == "-" {
                    String::new()
                } else {
                    format!(" errors: {}", c.errors())
                }
            ));
            if c.is_done() && !bar.is_finished() {
                bar.finish();
            }
        }
        if clones.iter().all(Status::is_done) {
            break;
        }
        std::thread::sleep(interval);
        *clones = refresh(client, name, clones)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Cmd::Status {
        name,
        watch: follow,
        interval,
        json,
    } = cli.cmd;
    let run = || -> Result<ExitCode, CtlError> {
        let mut client = Client::connect(&cli.socket)?;
        let clones = if follow {
            let clones = watch(
                &mut client,
                name.as_deref(),
                Duration::from_secs_f64(interval),
            )?;
            println!();
            clones
        } else {
            client.clones(name.as_deref())?
        };
        if json {
            let arr: Vec<&Value> = clones.iter().map(|c| &c.raw).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&arr).expect("a JSON value serializes")
            );
        } else {
            print_table(&clones);
        }
        Ok(exit_for(&clones))
    };
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clonectl: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(v: Value) -> Status {
        Status::from_json(&v).unwrap()
    }

    #[test]
    fn parses_the_contract_status_object() {
        let s = status(json!({
            "name": "Clone0", "state": "hydrating", "num_regions": 1000, "hydrated_regions": 250,
            "progress": {"percent": 25.0, "bytes_per_sec": 2097152, "eta_sec": 125},
            "source_released": false,
            "errors": {"source_read": 1, "dest_write": 0, "metadata": 0},
            "metadata": {"block_size": 4096, "used_blocks": 3, "total_blocks": 100, "mode": "rw"}
        }));
        assert_eq!((s.st.hydrated_regions, s.st.num_regions), (250, 1000));
        assert_eq!(s.rate(), "2.0");
        assert_eq!(s.eta(), "2m05s");
        assert_eq!(s.errors(), "src=1 dst=0 meta=0");
        assert!(!s.is_done() && !s.is_failed());
    }

    #[test]
    fn failed_and_read_only_metadata_end_a_watch_as_failures() {
        let base = json!({"name": "C", "num_regions": 4, "hydrated_regions": 1});
        let mut v = base.clone();
        v["state"] = json!("failed");
        assert!(status(v).is_failed());
        let mut v = base.clone();
        v["state"] = json!("hydrating");
        v["metadata"] = json!({"mode": "ro"});
        assert!(status(v.clone()).is_failed() && status(v).is_done());
        let mut v = base;
        v["state"] = json!("hydrated");
        let s = status(v.clone());
        assert!(!s.is_done(), "hydrated but not yet committed");
        v["source_released"] = json!(true);
        let s = status(v);
        assert!(s.is_done() && !s.is_failed());
        assert_eq!(s.eta(), "-");
    }

    #[test]
    fn tolerates_fields_it_does_not_know_and_keeps_them_for_json() {
        let s = status(json!({
            "name": "C", "state": "hydrating", "num_regions": 4, "hydrated_regions": 1,
            "hydration": {"chunk_kb": 128, "future": [1, 2]}, "newer_counter": 7
        }));
        assert_eq!(s.st.num_regions, 4);
        assert_eq!(s.raw["hydration"]["chunk_kb"], json!(128));
        assert_eq!(s.raw["newer_counter"], json!(7));
    }

    #[test]
    fn rejects_objects_missing_what_it_shows() {
        assert!(Status::from_json(&json!({"state": "hydrating"})).is_err());
        assert!(Status::from_json(&json!({"name": "C", "state": "hydrating"})).is_err());
    }

    #[test]
    fn any_name_prints_escaped_and_padded() {
        assert_eq!(
            escape("a\u{1b}[2J\nb\\c\u{e9}\u{1F600}"),
            "a\\u{1b}[2J\\nb\\\\c\u{e9}\u{1F600}"
        );
        let long = "n".repeat(70_000);
        assert_eq!(pad(&long, 70_001, false).len(), 70_001);
        assert_eq!(pad("\u{e9}", 3, true), "  \u{e9}");
        let s = status(
            json!({"name": long, "state": "hydrating", "num_regions": 1, "hydrated_regions": 0}),
        );
        print_table(&[s]);
    }

    #[test]
    fn a_pause_by_errors_exits_4_a_user_pause_0() {
        let base = json!({"name": "C", "state": "paused", "num_regions": 4, "hydrated_regions": 1});
        let mut v = base.clone();
        v["paused_reason"] = json!("source_errors");
        let s = status(v);
        assert!(s.is_paused_by_errors() && !s.is_done());
        assert_eq!(s.shown_state(), "paused:source_errors");
        assert_eq!(exit_for(&[s]), ExitCode::from(EXIT_PAUSED_BY_ERRORS));
        let mut v = base;
        v["paused_reason"] = json!("user");
        let s = status(v);
        assert!(!s.is_paused_by_errors());
        assert_eq!(exit_for(&[s]), ExitCode::SUCCESS);
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_secs(0), "0s");
        assert_eq!(fmt_secs(59), "59s");
        assert_eq!(fmt_secs(61), "1m01s");
        assert_eq!(fmt_secs(3725), "1h02m");
    }

    #[test]
    fn intervals() {
        assert!(parse_interval("0.5").is_ok());
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("x").is_err());
    }
}
