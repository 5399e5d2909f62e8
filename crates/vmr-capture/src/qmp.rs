//! A small asynchronous QMP client (tokio, Unix socket or TCP).
//!
//! Owns the QMP wire protocol: greeting, `qmp_capabilities`, one command at a time with an
//! `id` and a per-command timeout, QMP errors as [`QmpError::Command`] carrying class and
//! description, and an event buffer that [`QmpClient::wait_event`] searches.
//!
//! Commands are the typed structs of `qapi-qmp` (anything implementing [`qapi::Command`]); the
//! transport is hand-written on `serde_json` rather than `qapi`'s async stream because that
//! stream deserialises every event into the QEMU 9.1 schema (an event or enum value added by a
//! newer QEMU breaks the whole connection), has no per-command timeout, and panics on some
//! internal states. Query replies are read as JSON values for the same schema-drift reason.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::time::{Instant, timeout};

/// Largest QMP message accepted (a `query-named-block-nodes` of a big graph is well below).
const MAX_LINE: usize = 64 << 20;
/// Events kept while nobody waits for them; the oldest are dropped beyond this. The capture
/// clears the buffer after each teardown ([`QmpClient::clear_events`]), so this only bounds a
/// flood within one cycle.
const MAX_BUFFERED_EVENTS: usize = 1024;

pub use vmr_nbd::Endpoint;

/// `unix:/path` or `tcp:host:port`, for messages.
pub fn endpoint_str(ep: &Endpoint) -> String {
    match ep {
        Endpoint::Unix(p) => format!("unix:{}", p.display()),
        Endpoint::Tcp(a) => format!("tcp:{a}"),
    }
}

/// How a message from QEMU is not valid QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpFault {
    /// The first message is not the greeting.
    #[error("expected greeting, got {0}")]
    NoGreeting(Value),
    /// A reply with neither `return` nor `error`.
    #[error("reply without return or error: {0}")]
    ReplyShape(Value),
    /// A message longer than any QMP message this client accepts.
    #[error("qmp message exceeds 64 MiB")]
    TooLong,
    /// A line that is not JSON.
    #[error("invalid json from qemu: {0}")]
    Json(serde_json::Error),
}

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Could not connect to the monitor.
    #[error("cannot connect to qmp monitor {endpoint}")]
    Connect {
        /// The monitor address.
        endpoint: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("qmp i/o error")]
    Io(#[source] std::io::Error),
    /// QEMU closed the connection.
    #[error("qmp connection closed by qemu")]
    Closed,
    /// No answer in time.
    #[error("qmp timeout after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited (a command name, an event, the greeting).
        what: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// QEMU answered a command with an error.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        /// The command name.
        command: String,
        /// QMP error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// A message that is not valid QMP.
    #[error("qmp protocol error: {0}")]
    Protocol(QmpFault),
    /// A command's arguments or reply did not (de)serialise.
    #[error("qmp json error for {command}")]
    Json {
        /// The command name.
        command: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl QmpError {
    /// The QMP error description if this is a command error.
    pub fn desc(&self) -> Option<&str> {
        match self {
            QmpError::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

/// One asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `BLOCK_EXPORT_DELETED`.
    pub name: String,
    /// The event's `data` member (`null` when absent).
    pub data: Value,
}

impl QmpEvent {
    /// A string member of `data`, if present.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A connected QMP monitor in command mode. One command is outstanding at a time (`&mut self`).
pub struct QmpClient {
    reader: Reader,
    writer: Writer,
    line: Vec<u8>,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    timeout: Duration,
    version: (u64, u64, u64),
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("version", &self.version)
            .field("timeout", &self.timeout)
            .field("buffered_events", &self.events.len())
            .finish()
    }
}

/// Connections [`QmpClient::connect`] makes when QEMU closes them before its greeting.
/// QEMU 10.0's socket listener can accept a connection and drop it at once when a client
/// connects while the monitor (re)arms its listener (at start, as its I/O thread takes the
/// socket over, or as the previous client leaves): the accept callback is then briefly unset
/// (fixed upstream by "qio: Protect NetListener callback with mutex", not in 10.0.2). A
/// stressed test run saw `vm add` fail so on a monitor that had just started.
pub const GREETING_ATTEMPTS: u32 = 3;

/// Pause before connecting again after a connection closed before its greeting.
const GREETING_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How the handshake of one connection ended, when it did not give a client.
enum Handshake {
    /// QEMU closed the connection before its greeting (connecting again may succeed).
    ClosedBeforeGreeting,
    /// Anything else.
    Failed(QmpError),
}

impl From<Handshake> for QmpError {
    fn from(h: Handshake) -> QmpError {
        match h {
            Handshake::ClosedBeforeGreeting => QmpError::Closed,
            Handshake::Failed(e) => e,
        }
    }
}

impl QmpClient {
    /// Connect, read the greeting and enter command mode with `qmp_capabilities`. `timeout`
    /// bounds every later command too. A monitor already serving another client never sends a
    /// greeting: that shows as [`QmpError::Timeout`] on `greeting`. A connection QEMU closes
    /// before its greeting is made again, at most [`GREETING_ATTEMPTS`] connections in all
    /// (QEMU 10.0's listener race, see there); then the error is [`QmpError::Closed`].
    pub async fn connect(ep: &Endpoint, timeout_: Duration) -> Result<QmpClient, QmpError> {
        let mut attempt = 1;
        loop {
            let (r, w) = Self::open(ep, timeout_).await?;
            match Self::handshake(r, w, timeout_).await {
                Err(Handshake::ClosedBeforeGreeting) if attempt < GREETING_ATTEMPTS => {
                    tracing::debug!(
                        endpoint = %endpoint_str(ep),
                        attempt,
                        "qmp monitor closed the connection before its greeting; connecting again"
                    );
                    attempt += 1;
                    tokio::time::sleep(GREETING_RETRY_PAUSE).await;
                }
                r => return r.map_err(QmpError::from),
            }
        }
    }

    /// One connection to `ep`, split into its halves.
    async fn open(
        ep: &Endpoint,
        timeout_: Duration,
    ) -> Result<(Box<dyn AsyncRead + Send + Unpin>, Writer), QmpError> {
        let conn = async {
            match ep {
                Endpoint::Unix(p) => tokio::net::UnixStream::connect(p).await.map(|s| {
                    let (r, w) = s.into_split();
                    (
                        Box::new(r) as Box<dyn AsyncRead + Send + Unpin>,
                        Box::new(w) as Writer,
                    )
                }),
                Endpoint::Tcp(a) => tokio::net::TcpStream::connect(a.as_str()).await.map(|s| {
                    let _ = s.set_nodelay(true);
                    let (r, w) = s.into_split();
                    (
                        Box::new(r) as Box<dyn AsyncRead + Send + Unpin>,
                        Box::new(w) as Writer,
                    )
                }),
            }
        };
        timeout(timeout_, conn)
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("connect to {}", endpoint_str(ep)),
                after: timeout_,
            })?
            .map_err(|source| QmpError::Connect {
                endpoint: endpoint_str(ep),
                source,
            })
    }

    /// Run the handshake over an already connected byte stream (a test pipe, for example).
    pub async fn from_parts(
        r: Box<dyn AsyncRead + Send + Unpin>,
        w: Writer,
        timeout_: Duration,
    ) -> Result<QmpClient, QmpError> {
        Self::handshake(r, w, timeout_)
            .await
            .map_err(QmpError::from)
    }

    /// The greeting and `qmp_capabilities`; says apart a connection closed before the greeting.
    async fn handshake(
        r: Box<dyn AsyncRead + Send + Unpin>,
        w: Writer,
        timeout_: Duration,
    ) -> Result<QmpClient, Handshake> {
        let mut c = QmpClient {
            reader: BufReader::new(r),
            writer: w,
            line: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            timeout: timeout_,
            version: (0, 0, 0),
        };
        let greeting = match timeout(timeout_, c.read_message()).await {
            Err(_) => {
                return Err(Handshake::Failed(QmpError::Timeout {
                    what: "qmp greeting (is another client connected to this monitor?)".into(),
                    after: timeout_,
                }));
            }
            Ok(Err(QmpError::Closed)) => return Err(Handshake::ClosedBeforeGreeting),
            Ok(Err(e)) => return Err(Handshake::Failed(e)),
            Ok(Ok(g)) => g,
        };
        let qemu = greeting
            .get("QMP")
            .ok_or_else(|| QmpError::Protocol(QmpFault::NoGreeting(greeting.clone())))
            .map_err(Handshake::Failed)?
            .pointer("/version/qemu")
            .cloned()
            .unwrap_or(Value::Null);
        let num = |k: &str| qemu.get(k).and_then(Value::as_u64).unwrap_or(0);
        c.version = (num("major"), num("minor"), num("micro"));
        c.execute_value("qmp_capabilities", None)
            .await
            .map_err(Handshake::Failed)?;
        Ok(c)
    }

    /// QEMU's version from the greeting (major, minor, micro).
    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Execute a typed `qapi-qmp` command and deserialise its reply.
    pub async fn execute<C: qapi::Command>(&mut self, cmd: &C) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|source| QmpError::Json {
            command: C::NAME.into(),
            source,
        })?;
        let args = match args {
            Value::Object(m) if m.is_empty() => None,
            Value::Null => None,
            v => Some(v),
        };
        let ret = self.execute_value(C::NAME, args).await?;
        serde_json::from_value(ret).map_err(|source| QmpError::Json {
            command: C::NAME.into(),
            source,
        })
    }

    /// Execute a command by name with JSON arguments; returns the `return` member.
    pub async fn execute_value(
        &mut self,
        name: &str,
        args: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(name.into()));
        if let Some(a) = args {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), json!(id));
        let mut bytes =
            serde_json::to_vec(&Value::Object(msg)).map_err(|source| QmpError::Json {
                command: name.into(),
                source,
            })?;
        bytes.push(b'\n');
        tracing::trace!(command = name, "qmp execute");
        let limit = self.timeout;
        let exchange = async {
            self.writer.write_all(&bytes).await.map_err(QmpError::Io)?;
            self.writer.flush().await.map_err(QmpError::Io)?;
            loop {
                let v = self.read_message().await?;
                if v.get("id").and_then(Value::as_u64) != Some(id) {
                    // a late reply to an earlier, timed-out command
                    continue;
                }
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = v.get("error") {
                    let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    return Err(QmpError::Command {
                        command: name.into(),
                        class: s("class"),
                        desc: s("desc"),
                    });
                }
                return Err(QmpError::Protocol(QmpFault::ReplyShape(v)));
            }
        };
        timeout(limit, exchange)
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("command {name}"),
                after: limit,
            })?
    }

    /// Drop every buffered event. The caller knows that nothing buffered so far can still be
    /// waited for (the capture, after a teardown: every job and export it named is gone). Without
    /// this, events nobody waits for (a cycle's `JOB_STATUS_CHANGE`s and `BLOCK_JOB_CANCELLED`,
    /// about 15 per cycle) piled up in every VM's connection up to [`MAX_BUFFERED_EVENTS`].
    pub fn clear_events(&mut self) {
        self.events = VecDeque::new();
    }

    /// Events read and not yet taken by a wait or dropped.
    pub fn buffered_events(&self) -> usize {
        self.events.len()
    }

    /// Drop buffered events for which `pred` holds (stale events before a new wait).
    pub fn discard_events(&mut self, pred: impl Fn(&QmpEvent) -> bool) {
        self.events.retain(|e| !pred(e));
    }

    /// Wait up to `limit` for an event matching `pred` (buffered ones count); it is removed
    /// from the buffer and returned.
    pub async fn wait_event(
        &mut self,
        pred: impl Fn(&QmpEvent) -> bool,
        limit: Duration,
    ) -> Result<QmpEvent, QmpError> {
        if let Some(e) = self
            .events
            .iter()
            .position(&pred)
            .and_then(|i| self.events.remove(i))
        {
            return Ok(e);
        }
        let deadline = Instant::now() + limit;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout {
                    what: "event".into(),
                    after: limit,
                });
            }
            match timeout(deadline - now, self.read_message()).await {
                Err(_) => {
                    return Err(QmpError::Timeout {
                        what: "event".into(),
                        after: limit,
                    });
                }
                Ok(r) => {
                    // read_message buffers events; a reply here is a stale one
                    r?;
                }
            }
            if let Some(e) = self
                .events
                .iter()
                .position(&pred)
                .and_then(|i| self.events.remove(i))
            {
                return Ok(e);
            }
        }
    }

    /// Read one message; events are buffered and also returned (so that waiters can look).
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            // read_until appends to a buffer we keep, so a timeout never loses a partial line
            let n = (&mut self.reader)
                .take((MAX_LINE + 1 - self.line.len()) as u64)
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(QmpError::Io)?;
            if !self.line.ends_with(b"\n") {
                if n == 0 {
                    return Err(QmpError::Closed);
                }
                if self.line.len() > MAX_LINE {
                    return Err(QmpError::Protocol(QmpFault::TooLong));
                }
                continue;
            }
            let line = std::mem::take(&mut self.line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value =
                serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(QmpFault::Json(e)))?;
            if let Some(name) = v.get("event").and_then(Value::as_str) {
                let ev = QmpEvent {
                    name: name.to_owned(),
                    data: v.get("data").cloned().unwrap_or(Value::Null),
                };
                tracing::trace!(event = %ev.name, "qmp event");
                if self.events.len() >= MAX_BUFFERED_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(ev);
            }
            return Ok(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake monitor's side of the handshake: QEMU 10.0.2's greeting, then the answer to
    /// `qmp_capabilities`.
    async fn handshake_as_qemu<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
        s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10, \"minor\": 0, \"micro\": 2}}, \"capabilities\": []}}\r\n")
            .await
            .expect("greet");
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.expect("read caps");
        let req: Value = serde_json::from_slice(&buf[..n]).expect("json");
        assert_eq!(req["execute"], "qmp_capabilities");
        let id = req["id"].clone();
        s.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
            .await
            .expect("w");
    }

    /// A fake monitor on an in-memory pipe: sends `script` lines after reading each request.
    async fn pair() -> (QmpClient, tokio::io::DuplexStream) {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(a);
        let server = async move {
            handshake_as_qemu(&mut b).await;
            b
        };
        let client = QmpClient::from_parts(Box::new(r), Box::new(w), Duration::from_secs(2));
        let (c, b) = tokio::join!(client, server);
        (c.expect("client"), b)
    }

    /// A fake monitor on a Unix socket: drops the first `drops` connections at once (QEMU
    /// 10.0's listener race), then, if `greet`, greets the next one and answers
    /// `qmp_capabilities`. Returns the listener and how many connections it accepted.
    async fn monitor(
        listener: tokio::net::UnixListener,
        drops: u32,
        greet: bool,
    ) -> (tokio::net::UnixListener, u32) {
        let mut accepted = 0;
        while accepted < drops {
            let (s, _) = listener.accept().await.expect("accept");
            accepted += 1;
            drop(s);
        }
        if greet {
            let (mut s, _) = listener.accept().await.expect("accept");
            accepted += 1;
            handshake_as_qemu(&mut s).await;
        }
        (listener, accepted)
    }

    #[tokio::test]
    async fn a_connection_closed_before_the_greeting_is_made_again() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("qmp.sock");
        let ep = Endpoint::Unix(path.clone());
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");

        // Dropped twice, greeted on the third connection: connected.
        let server = tokio::spawn(monitor(listener, GREETING_ATTEMPTS - 1, true));
        let c = QmpClient::connect(&ep, Duration::from_secs(5))
            .await
            .expect("connected on the last attempt");
        assert_eq!(c.version(), (10, 0, 2));
        let (listener, accepted) = server.await.expect("server");
        assert_eq!(accepted, GREETING_ATTEMPTS);

        // Dropped every time: `Closed` after GREETING_ATTEMPTS connections, and no more.
        let server = tokio::spawn(monitor(listener, GREETING_ATTEMPTS, false));
        let e = QmpClient::connect(&ep, Duration::from_secs(5))
            .await
            .expect_err("never greeted");
        assert!(matches!(e, QmpError::Closed), "{e:?}");
        let (listener, accepted) = server.await.expect("server");
        assert_eq!(accepted, GREETING_ATTEMPTS);
        let more = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(more.is_err(), "a connection after the client gave up");
    }

    async fn read_req(b: &mut tokio::io::DuplexStream) -> Value {
        let mut buf = vec![0u8; 65536];
        let n = b.read(&mut buf).await.expect("read");
        serde_json::from_slice(&buf[..n]).expect("json")
    }

    #[tokio::test]
    async fn typed_command_error_and_events() {
        let (mut c, mut b) = pair().await;
        assert_eq!(c.version(), (10, 0, 2));
        let cmd = qapi::qmp::blockdev_del {
            node_name: "x".into(),
        };
        let server = async {
            let req = read_req(&mut b).await;
            assert_eq!(req["execute"], "blockdev-del");
            assert_eq!(req["arguments"]["node-name"], "x");
            let id = &req["id"];
            // an event, a stale reply, then the error
            b.write_all(b"{\"event\": \"BLOCK_EXPORT_DELETED\", \"data\": {\"id\": \"e1\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n")
                .await
                .expect("w");
            b.write_all(b"{\"return\": {}, \"id\": 9999}\n")
                .await
                .expect("w");
            b.write_all(
                format!("{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"Node x is in use\"}}, \"id\": {id}}}\n")
                    .as_bytes(),
            )
            .await
            .expect("w");
            b
        };
        let (res, mut b) = tokio::join!(c.execute(&cmd), server);
        match res {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "blockdev-del");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "Node x is in use");
            }
            other => panic!("unexpected {other:?}"),
        }
        let ev = c
            .wait_event(
                |e| e.name == "BLOCK_EXPORT_DELETED" && e.str_field("id") == Some("e1"),
                Duration::from_millis(100),
            )
            .await
            .expect("buffered event");
        assert_eq!(ev.str_field("id"), Some("e1"));
        // nothing more: times out
        let r = c
            .wait_event(|e| e.name == "X", Duration::from_millis(50))
            .await;
        assert!(matches!(r, Err(QmpError::Timeout { .. })), "{r:?}");
        // an event arriving later, split across writes
        let server = async {
            b.write_all(b"{\"event\": \"BLOCK_JOB_CANC")
                .await
                .expect("w");
            tokio::time::sleep(Duration::from_millis(20)).await;
            b.write_all(b"ELLED\", \"data\": {\"device\": \"j\"}}\n")
                .await
                .expect("w");
            b
        };
        let (ev, _b) = tokio::join!(
            c.wait_event(|e| e.name == "BLOCK_JOB_CANCELLED", Duration::from_secs(2)),
            server
        );
        assert_eq!(ev.expect("event").str_field("device"), Some("j"));
    }

    #[tokio::test]
    async fn command_timeout_and_closed() {
        let (mut c, b) = pair().await;
        let r = c.execute_value("query-block-jobs", None).await;
        // the fake server never answers within the 2 s timeout
        assert!(matches!(r, Err(QmpError::Timeout { .. })), "{r:?}");
        drop(b);
        let r = c.execute_value("query-block-jobs", None).await;
        assert!(
            matches!(r, Err(QmpError::Closed) | Err(QmpError::Io(_))),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let (mut c, mut b) = pair().await;
        let server = async {
            let _ = read_req(&mut b).await;
            b.write_all(b"not json\n").await.expect("w");
            b
        };
        let (r, _b) = tokio::join!(c.execute_value("query-block-jobs", None), server);
        assert!(
            matches!(r, Err(QmpError::Protocol(QmpFault::Json(_)))),
            "{r:?}"
        );
    }
}
