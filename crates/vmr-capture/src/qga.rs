//! A small asynchronous client for qemu-guest-agent (QGA) over the VM's virtio-serial channel
//! (a Unix socket on the host).
//!
//! Owns the QGA wire protocol as the host sees it: the channel is a byte stream that outlives
//! clients, so it may still hold an earlier client's unread answers. Every session therefore
//! starts with `guest-sync-delimited` and a random id: the agent answers with a 0xFF byte
//! (which never occurs in JSON) followed by the id, and the client throws away everything up
//! to the delimiter and every answer that does not carry its id. Then one command at a time,
//! each with its own timeout, answers as JSON values read with a size bound.
//!
//! What the guest sends is untrusted input: the parser ([`Parser`]) never panics, keeps at most
//! [`MAX_MESSAGE`] bytes of one answer, and turns anything unexpected into [`QgaError`].
//! Typed calls: [`GuestAgent::ping`], [`GuestAgent::info`], [`GuestAgent::fsfreeze_freeze`],
//! [`GuestAgent::fsfreeze_thaw`], [`GuestAgent::fsfreeze_status`], [`GuestAgent::shutdown`],
//! and [`GuestAgent::thaw_until_thawed`] (thaw retried until the status says thawed, bounded).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout};

/// Largest answer accepted from the guest (a `guest-info` lists every command: a few KiB).
pub const MAX_MESSAGE: usize = 1 << 20;
/// The delimiter byte qemu-guest-agent puts before its `guest-sync-delimited` answer.
const DELIMITER: u8 = 0xFF;
/// Bytes skipped while looking for the sync answer before giving up (stale output is bounded
/// by what earlier clients left unread; more means the channel is not a guest agent).
const MAX_SKIP: usize = 16 << 20;

/// How the guest's output is not a QGA answer.
#[derive(Debug, thiserror::Error)]
pub enum QgaFault {
    /// A message that is not JSON.
    #[error("invalid json from the guest: {0}")]
    Json(serde_json::Error),
    /// No answer to `guest-sync-delimited` in 16 MiB of the guest's output.
    #[error("no guest-sync-delimited answer in 16 MiB of output")]
    NoSyncAnswer,
}

/// Errors of the guest agent client.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// Could not connect to the agent's socket.
    #[error("cannot connect to the guest agent socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the channel failed.
    #[error("guest agent i/o error")]
    Io(#[source] std::io::Error),
    /// The channel closed (QEMU went away or the agent's port was closed).
    #[error("guest agent channel closed")]
    Closed,
    /// No answer in time (the agent is not running in the guest, or hangs).
    #[error("guest agent did not answer {command} within {after:?}")]
    Timeout {
        /// The command awaited.
        command: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The agent answered a command with an error.
    #[error("guest agent command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QGA error class.
        class: String,
        /// The agent's description.
        desc: String,
    },
    /// The guest sent something that is not a QGA answer.
    #[error("guest agent protocol error: {0}")]
    Protocol(QgaFault),
    /// A command could not be encoded (a bug: the commands are this crate's own).
    #[error("cannot encode {command}")]
    Encode {
        /// The command.
        command: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// An answer exceeded [`MAX_MESSAGE`] bytes.
    #[error("guest agent answer exceeds {MAX_MESSAGE} bytes")]
    TooLong,
    /// An answer had the right shape but not the expected content.
    #[error("unexpected guest agent answer to {command}: {answer}")]
    Unexpected {
        /// The command.
        command: String,
        /// The answer, cut to 200 characters.
        answer: String,
    },
    /// The file systems stayed frozen after every thaw attempt.
    #[error("guest file systems still frozen after {attempts} thaw attempts")]
    StillFrozen {
        /// Thaw attempts made.
        attempts: u32,
    },
}

/// One item the parser produced from the guest's bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A 0xFF delimiter byte.
    Delimiter,
    /// One complete JSON value.
    Message(Value),
}

/// Incremental parser of the guest's output: 0xFF delimiters and concatenated JSON objects
/// (qemu-guest-agent ends each answer with a newline, but nothing here relies on it). Bounded:
/// one message may be at most [`MAX_MESSAGE`] bytes.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    /// A parser with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes buffered and not yet parsed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Add bytes read from the channel.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Drop everything buffered (after a resync).
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// The next complete item, `Ok(None)` when more bytes are needed. Whitespace between
    /// messages is skipped; invalid JSON is an error (the buffer is then dropped up to the
    /// next delimiter or newline, so a later call can go on).
    pub fn next_item(&mut self) -> Result<Option<Item>, QgaError> {
        let start = self
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buf.len());
        self.buf.drain(..start);
        let Some(&first) = self.buf.first() else {
            return Ok(None);
        };
        if first == DELIMITER {
            self.buf.drain(..1);
            return Ok(Some(Item::Delimiter));
        }
        // A value ends at the first point where serde_json can read one whole value; a
        // delimiter inside the buffer bounds where to look (it never occurs in JSON).
        let end = self
            .buf
            .iter()
            .position(|&b| b == DELIMITER)
            .unwrap_or(self.buf.len());
        let mut stream =
            serde_json::Deserializer::from_slice(&self.buf[..end]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => {
                let used = stream.byte_offset();
                self.buf.drain(..used);
                Ok(Some(Item::Message(v)))
            }
            Some(Err(e)) if e.is_eof() && end == self.buf.len() => {
                if self.buf.len() > MAX_MESSAGE {
                    self.buf.clear();
                    return Err(QgaError::TooLong);
                }
                Ok(None)
            }
            Some(Err(e)) => {
                // skip the garbage: up to the next newline or delimiter
                let skip = self.buf[..end]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(end, |p| p + 1)
                    .max(1);
                self.buf.drain(..skip);
                Err(QgaError::Protocol(QgaFault::Json(e)))
            }
            None => Ok(None),
        }
    }
}

/// `guest-fsfreeze-status`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    /// No file system is frozen.
    Thawed,
    /// The guest's file systems are frozen.
    Frozen,
}

/// What `guest-info` tells that vmreplica uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// The agent's version.
    pub version: String,
    /// Commands the agent offers and has enabled.
    pub enabled_commands: Vec<String>,
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A synchronised session with a guest agent. One command at a time (`&mut self`).
pub struct GuestAgent {
    reader: Reader,
    writer: Writer,
    parser: Parser,
    timeout: Duration,
}

impl std::fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestAgent")
            .field("timeout", &self.timeout)
            .field("buffered", &self.parser.buffered())
            .finish()
    }
}

impl GuestAgent {
    /// Connect to the agent's socket and synchronise (`guest-sync-delimited`). `timeout`
    /// bounds the connect, the sync and every later command unless a call says otherwise.
    pub async fn connect(path: &Path, timeout_: Duration) -> Result<GuestAgent, QgaError> {
        let stream = timeout(timeout_, tokio::net::UnixStream::connect(path))
            .await
            .map_err(|_| QgaError::Timeout {
                command: "connect".into(),
                after: timeout_,
            })?
            .map_err(|source| QgaError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (r, w) = stream.into_split();
        Self::from_parts(Box::new(r), Box::new(w), timeout_).await
    }

    /// Synchronise over an already connected byte stream (used by [`Self::connect`]).
    pub async fn from_parts(
        r: Reader,
        w: Writer,
        timeout_: Duration,
    ) -> Result<GuestAgent, QgaError> {
        let mut g = GuestAgent {
            reader: r,
            writer: w,
            parser: Parser::new(),
            timeout: timeout_,
        };
        g.sync(timeout_).await?;
        Ok(g)
    }

    /// `guest-sync-delimited` with a fresh random id: skip to the delimiter, then to the
    /// answer carrying the id. Stale answers of earlier clients are dropped.
    pub async fn sync(&mut self, limit: Duration) -> Result<(), QgaError> {
        let id = random_id();
        // A leading 0xFF makes an agent that was in the middle of reading a request from an
        // earlier, vanished client drop that partial request.
        self.writer
            .write_all(&[DELIMITER])
            .await
            .map_err(QgaError::Io)?;
        self.send("guest-sync-delimited", Some(json!({ "id": id })))
            .await?;
        let deadline = Instant::now() + limit;
        let mut skipped = 0usize;
        let mut seen_delimiter = false;
        loop {
            let item = match self.parser.next_item() {
                Ok(Some(i)) => i,
                Ok(None) => {
                    let before = self.parser.buffered();
                    self.fill(deadline, "guest-sync-delimited", limit).await?;
                    skipped += self.parser.buffered().saturating_sub(before);
                    if skipped > MAX_SKIP {
                        return Err(QgaError::Protocol(QgaFault::NoSyncAnswer));
                    }
                    continue;
                }
                // stale garbage before the delimiter is not our business
                Err(QgaError::Protocol(_)) | Err(QgaError::TooLong) if !seen_delimiter => continue,
                Err(e) => return Err(e),
            };
            match item {
                Item::Delimiter => seen_delimiter = true,
                Item::Message(v) if seen_delimiter => {
                    if v.get("return").and_then(Value::as_u64) == Some(u64::from(id)) {
                        return Ok(());
                    }
                    // an earlier client's sync answer or a stale reply: keep looking
                }
                Item::Message(_) => {}
            }
        }
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn send(&mut self, command: &str, args: Option<Value>) -> Result<(), QgaError> {
        let mut msg = serde_json::Map::new();
        msg.insert("execute".into(), Value::String(command.into()));
        if let Some(a) = args {
            msg.insert("arguments".into(), a);
        }
        let mut bytes =
            serde_json::to_vec(&Value::Object(msg)).map_err(|source| QgaError::Encode {
                command: command.to_owned(),
                source,
            })?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await.map_err(QgaError::Io)?;
        self.writer.flush().await.map_err(QgaError::Io)
    }

    async fn fill(
        &mut self,
        deadline: Instant,
        command: &str,
        limit: Duration,
    ) -> Result<(), QgaError> {
        let mut chunk = [0u8; 16384];
        let now = Instant::now();
        if now >= deadline {
            return Err(QgaError::Timeout {
                command: command.into(),
                after: limit,
            });
        }
        let n = timeout(deadline - now, self.reader.read(&mut chunk))
            .await
            .map_err(|_| QgaError::Timeout {
                command: command.into(),
                after: limit,
            })?
            .map_err(QgaError::Io)?;
        if n == 0 {
            return Err(QgaError::Closed);
        }
        self.parser.push(&chunk[..n]);
        Ok(())
    }

    /// Run a command and return its `return` member, within `limit`.
    pub async fn execute_within(
        &mut self,
        command: &str,
        args: Option<Value>,
        limit: Duration,
    ) -> Result<Value, QgaError> {
        self.send(command, args).await?;
        let deadline = Instant::now() + limit;
        loop {
            match self.parser.next_item()? {
                None => self.fill(deadline, command, limit).await?,
                Some(Item::Delimiter) => {}
                Some(Item::Message(v)) => {
                    if let Some(r) = v.get("return") {
                        return Ok(r.clone());
                    }
                    if let Some(e) = v.get("error") {
                        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                        return Err(QgaError::Command {
                            command: command.into(),
                            class: s("class"),
                            desc: s("desc"),
                        });
                    }
                    return Err(unexpected(command, &v));
                }
            }
        }
    }

    /// Run a command with the session's timeout.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QgaError> {
        let limit = self.timeout;
        self.execute_within(command, args, limit).await
    }

    /// `guest-ping`.
    pub async fn ping(&mut self) -> Result<(), QgaError> {
        self.execute("guest-ping", None).await.map(|_| ())
    }

    /// `guest-info`: the agent's version and enabled commands.
    pub async fn info(&mut self) -> Result<GuestInfo, QgaError> {
        let v = self.execute("guest-info", None).await?;
        let version = v
            .get("version")
            .and_then(Value::as_str)
            .ok_or_else(|| unexpected("guest-info", &v))?
            .to_owned();
        let enabled_commands = v
            .get("supported_commands")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter(|c| c.get("enabled").and_then(Value::as_bool) == Some(true))
                    .filter_map(|c| c.get("name").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(GuestInfo {
            version,
            enabled_commands,
        })
    }

    /// `guest-fsfreeze-freeze` within `limit` (the guest's fsfreeze-hook scripts run first):
    /// the number of file systems frozen.
    pub async fn fsfreeze_freeze(&mut self, limit: Duration) -> Result<u64, QgaError> {
        let v = self
            .execute_within("guest-fsfreeze-freeze", None, limit)
            .await?;
        v.as_u64()
            .ok_or_else(|| unexpected("guest-fsfreeze-freeze", &v))
    }

    /// `guest-fsfreeze-thaw`: the number of file systems thawed.
    pub async fn fsfreeze_thaw(&mut self) -> Result<u64, QgaError> {
        let v = self.execute("guest-fsfreeze-thaw", None).await?;
        v.as_u64()
            .ok_or_else(|| unexpected("guest-fsfreeze-thaw", &v))
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&mut self) -> Result<FreezeStatus, QgaError> {
        let v = self.execute("guest-fsfreeze-status", None).await?;
        match v.as_str() {
            Some("thawed") => Ok(FreezeStatus::Thawed),
            Some("frozen") => Ok(FreezeStatus::Frozen),
            _ => Err(unexpected("guest-fsfreeze-status", &v)),
        }
    }

    /// `guest-shutdown` (powerdown). The agent answers nothing on success: the guest goes
    /// down. Success here means the request was written and no error came back within
    /// `grace`; the caller waits for QEMU to see the guest stop.
    pub async fn shutdown(&mut self, grace: Duration) -> Result<(), QgaError> {
        self.send("guest-shutdown", Some(json!({ "mode": "powerdown" })))
            .await?;
        match self
            .execute_within_reply_only("guest-shutdown", grace)
            .await
        {
            Ok(Some(v)) => match v.get("error") {
                Some(e) => {
                    let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    Err(QgaError::Command {
                        command: "guest-shutdown".into(),
                        class: s("class"),
                        desc: s("desc"),
                    })
                }
                None => Ok(()),
            },
            // silence or the channel closing are what a shutting-down guest gives
            Ok(None) | Err(QgaError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Wait up to `limit` for one answer; `None` when none came.
    async fn execute_within_reply_only(
        &mut self,
        command: &str,
        limit: Duration,
    ) -> Result<Option<Value>, QgaError> {
        let deadline = Instant::now() + limit;
        loop {
            match self.parser.next_item()? {
                Some(Item::Message(v)) => return Ok(Some(v)),
                Some(Item::Delimiter) => {}
                None => match self.fill(deadline, command, limit).await {
                    Ok(()) => {}
                    Err(QgaError::Timeout { .. }) => return Ok(None),
                    Err(e) => return Err(e),
                },
            }
        }
    }

    /// Thaw, then check `guest-fsfreeze-status`, up to `attempts` times (resynchronising the
    /// session after a failed step, which may have left a late answer in the channel) until
    /// it says thawed. Returns the attempts used and when the thaw that worked answered (when
    /// the status said thawed, if that thaw's answer was lost).
    pub async fn thaw_until_thawed(
        &mut self,
        attempts: u32,
    ) -> Result<(u32, std::time::Instant), QgaError> {
        let mut last = None;
        for n in 1..=attempts.max(1) {
            if n > 1 {
                let limit = self.timeout;
                if let Err(e) = self.sync(limit).await {
                    last = Some(e);
                    continue;
                }
            }
            let thaw = self.fsfreeze_thaw().await.err();
            let answered = std::time::Instant::now();
            if let Some(e) = &thaw {
                tracing::debug!(attempt = n, error = %e, "guest-fsfreeze-thaw failed");
            }
            match self.fsfreeze_status().await {
                Ok(FreezeStatus::Thawed) if thaw.is_none() => return Ok((n, answered)),
                Ok(FreezeStatus::Thawed) => return Ok((n, std::time::Instant::now())),
                Ok(FreezeStatus::Frozen) => last = thaw,
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(QgaError::StillFrozen { attempts }))
    }
}

/// A random sync id (std's per-process random hash keys, mixed with the time): unlike an
/// earlier client's, so its stale answer is never taken for ours.
fn random_id() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() as u32) & 0x7fff_ffff
}

fn unexpected(command: &str, v: &Value) -> QgaError {
    let mut answer = v.to_string();
    if answer.len() > 200 {
        let mut cut = 200;
        while !answer.is_char_boundary(cut) {
            cut -= 1;
        }
        answer.truncate(cut);
    }
    QgaError::Unexpected {
        command: command.into(),
        answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    #[test]
    fn parser_delimiters_split_and_garbage() {
        let mut p = Parser::new();
        p.push(b"{\"return\": 1}\n\xff{\"ret");
        assert_eq!(
            p.next_item().expect("ok"),
            Some(Item::Message(json!({"return": 1})))
        );
        assert_eq!(p.next_item().expect("ok"), Some(Item::Delimiter));
        assert_eq!(p.next_item().expect("ok"), None);
        p.push(b"urn\": 7}");
        assert_eq!(
            p.next_item().expect("ok"),
            Some(Item::Message(json!({"return": 7})))
        );
        p.push(b"not json\n{\"return\": {}}");
        assert!(matches!(p.next_item(), Err(QgaError::Protocol(_))));
        assert_eq!(
            p.next_item().expect("ok"),
            Some(Item::Message(json!({"return": {}})))
        );
        // a truncated answer cut by a delimiter is an error, then the delimiter comes out
        p.push(b"{\"ret\xff");
        assert!(matches!(p.next_item(), Err(QgaError::Protocol(_))));
        assert_eq!(p.next_item().expect("ok"), Some(Item::Delimiter));
    }

    #[test]
    fn parser_is_bounded() {
        let mut p = Parser::new();
        p.push(b"[\"");
        p.push(&vec![b'a'; MAX_MESSAGE + 10]);
        assert!(matches!(p.next_item(), Err(QgaError::TooLong)));
        assert_eq!(p.buffered(), 0);
        // arbitrary bytes never panic
        for seed in 0u32..200 {
            let mut p = Parser::new();
            let bytes: Vec<u8> = (0..64u32)
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 97) >> 7) as u8)
                .collect();
            p.push(&bytes);
            for _ in 0..100 {
                if let Ok(None) = p.next_item() {
                    break;
                }
            }
        }
    }

    /// A fake guest agent on an in-memory pipe: answers each request line as `answer` says
    /// (`None` = no answer).
    fn fake(
        stale: &'static [u8],
        answer: impl Fn(&Value) -> Option<Vec<u8>> + Send + 'static,
    ) -> (Reader, Writer, tokio::task::JoinHandle<Vec<String>>) {
        let (a, b): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(a);
        let task = tokio::spawn(async move {
            let (br, mut bw) = tokio::io::split(b);
            bw.write_all(stale).await.expect("stale");
            let mut lines = BufReader::new(br);
            let mut seen = Vec::new();
            let mut line = Vec::new();
            loop {
                line.clear();
                match lines.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return seen,
                    Ok(_) => {}
                }
                let text: Vec<u8> = line.iter().copied().filter(|&b| b != DELIMITER).collect();
                let Ok(req) = serde_json::from_slice::<Value>(&text) else {
                    continue;
                };
                let cmd = req["execute"].as_str().unwrap_or("").to_owned();
                seen.push(cmd.clone());
                let out = if cmd == "guest-sync-delimited" {
                    let mut v = vec![DELIMITER];
                    v.extend_from_slice(
                        format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes(),
                    );
                    Some(v)
                } else {
                    answer(&req)
                };
                if let Some(o) = out
                    && bw.write_all(&o).await.is_err()
                {
                    return seen;
                }
            }
        });
        (Box::new(r), Box::new(w), task)
    }

    #[tokio::test]
    async fn sync_skips_stale_output_and_commands_answer() {
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = frozen.clone();
        let (r, w, task) = fake(
            b"{\"return\": 5}\n\xff{\"return\": 12345}\n{\"return\": \"thawed\"}\n",
            move |req| {
                use std::sync::atomic::Ordering::SeqCst;
                let ret = match req["execute"].as_str()? {
                    "guest-ping" => json!({}),
                    "guest-fsfreeze-freeze" => {
                        f.store(true, SeqCst);
                        json!(2)
                    }
                    "guest-fsfreeze-thaw" => {
                        f.store(false, SeqCst);
                        json!(2)
                    }
                    "guest-fsfreeze-status" => {
                        json!(if f.load(SeqCst) { "frozen" } else { "thawed" })
                    }
                    "guest-info" => json!({"version": "7.2.19", "supported_commands": [
                        {"name": "guest-ping", "enabled": true},
                        {"name": "guest-exec", "enabled": false}]}),
                    _ => {
                        return Some(
                            b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no\"}}\n"
                                .to_vec(),
                        );
                    }
                };
                Some(format!("{}\n", json!({ "return": ret })).into_bytes())
            },
        );
        let mut g = GuestAgent::from_parts(r, w, Duration::from_secs(2))
            .await
            .expect("sync");
        g.ping().await.expect("ping");
        let info = g.info().await.expect("info");
        assert_eq!(info.version, "7.2.19");
        assert_eq!(info.enabled_commands, vec!["guest-ping".to_owned()]);
        assert_eq!(
            g.fsfreeze_freeze(Duration::from_secs(1)).await.expect("f"),
            2
        );
        assert_eq!(g.fsfreeze_status().await.expect("s"), FreezeStatus::Frozen);
        assert_eq!(g.thaw_until_thawed(3).await.expect("thaw").0, 1);
        let e = g.execute("guest-bogus", None).await.expect_err("error");
        assert!(
            matches!(&e, QgaError::Command { class, .. } if class == "CommandNotFound"),
            "{e:?}"
        );
        drop(g);
        let seen = task.await.expect("fake");
        assert_eq!(seen[0], "guest-sync-delimited");
    }

    #[tokio::test]
    async fn silent_agent_times_out_and_shutdown_accepts_silence() {
        // nobody answers, not even the sync
        let (a, _b) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(a);
        let r = GuestAgent::from_parts(Box::new(r), Box::new(w), Duration::from_millis(100)).await;
        assert!(matches!(r, Err(QgaError::Timeout { .. })), "{r:?}");

        let (r, w, task) = fake(b"", |_| None);
        let mut g = GuestAgent {
            reader: r,
            writer: w,
            parser: Parser::new(),
            timeout: Duration::from_millis(100),
        };
        g.shutdown(Duration::from_millis(50))
            .await
            .expect("silence is success");
        drop(g);
        assert_eq!(task.await.expect("fake"), vec!["guest-shutdown".to_owned()]);
    }

    #[tokio::test]
    async fn thaw_retries_until_thawed() {
        // the first thaw is ignored (still frozen), the second works
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = count.clone();
        let (r, w, _task) = fake(b"", move |req| {
            use std::sync::atomic::Ordering::SeqCst;
            let ret = match req["execute"].as_str()? {
                "guest-fsfreeze-thaw" => {
                    c.fetch_add(1, SeqCst);
                    json!(0)
                }
                "guest-fsfreeze-status" => {
                    json!(if c.load(SeqCst) >= 2 {
                        "thawed"
                    } else {
                        "frozen"
                    })
                }
                _ => json!({}),
            };
            Some(format!("{}\n", json!({ "return": ret })).into_bytes())
        });
        let mut g = GuestAgent::from_parts(r, w, Duration::from_secs(1))
            .await
            .expect("sync");
        assert_eq!(g.thaw_until_thawed(5).await.expect("thawed").0, 2);
    }
}
