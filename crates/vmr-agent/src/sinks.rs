//! The event sinks of `config.toml` (`[[events.webhook]]`, `[[events.command]]`): one task
//! per sink with a bounded queue. Offering an event never waits: a full queue drops it,
//! counts it and logs it. A webhook POSTs the event's JSON (HTTP/1.1; https with rustls and
//! the system's roots or the sink's `ca-file`), retried with exponential backoff; a command
//! runs without a shell, the event in `VMR_EVENT_*` variables and its JSON on stdin, killed
//! at its timeout.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use vmr_proto::event::{CommandSink, Event, Severity, WebhookSink};

/// The system's CA bundle (Debian's `ca-certificates`), the roots of an https webhook with
/// no `ca-file`.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why one delivery failed (logged; the webhook retries).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The URL is not `http://` or `https://` with a host.
    #[error("bad webhook URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Connecting failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// HOST:PORT.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading the trust roots failed.
    #[error("reading the CA certificates {path}: {source}")]
    Roots {
        /// The PEM file.
        path: String,
        /// The cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// No usable root certificate.
    #[error("no usable CA certificate in {path}")]
    NoRoots {
        /// The PEM file.
        path: String,
    },
    /// The TLS configuration or name is invalid.
    #[error("TLS to {host}: {source}")]
    Tls {
        /// The server name.
        host: String,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The server name is not a DNS name or address.
    #[error("TLS to {host}: not a valid server name")]
    ServerName {
        /// The server name.
        host: String,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {addr}: {source}")]
    Handshake {
        /// HOST:PORT.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("HTTP POST to {url}: {source}")]
    Http {
        /// The URL.
        url: String,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The request does not build (a bad header value).
    #[error("HTTP POST to {url}: {source}")]
    Request {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: http::Error,
    },
    /// The server answered with a status other than 2xx.
    #[error("HTTP POST to {url}: the server answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// Its status.
        status: http::StatusCode,
    },
    /// The attempt took longer than the sink's timeout.
    #[error("HTTP POST to {url}: no answer within {secs} s")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout.
        secs: u64,
    },
    /// The command could not be started or waited for.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command ran past its timeout (it was killed).
    #[error("{program} ran longer than {secs} s and was killed")]
    CommandTimeout {
        /// The program.
        program: String,
        /// The timeout.
        secs: u64,
    },
    /// The command failed.
    #[error("{program} exited with {status}")]
    CommandFailed {
        /// The program.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The command sink has no program.
    #[error("a command sink with an empty argv")]
    EmptyArgv,
}

/// One sink's queue.
struct Queue {
    name: String,
    min: Severity,
    tx: mpsc::Sender<Arc<Event>>,
    dropped: AtomicU64,
}

/// Every configured sink.
#[derive(Default)]
pub struct Sinks {
    queues: Vec<Queue>,
}

impl Sinks {
    /// Start one task per sink (inside the agent's runtime).
    pub fn start(webhooks: &[WebhookSink], commands: &[CommandSink]) -> Sinks {
        let mut queues = Vec::new();
        for w in webhooks {
            let (tx, rx) = mpsc::channel(w.queue.max(1));
            tokio::spawn(run_webhook(w.clone(), rx));
            queues.push(Queue {
                name: format!("webhook {}", w.url),
                min: w.min_severity,
                tx,
                dropped: AtomicU64::new(0),
            });
        }
        for c in commands {
            let (tx, rx) = mpsc::channel(c.queue.max(1));
            tokio::spawn(run_command_sink(c.clone(), rx));
            queues.push(Queue {
                name: format!("command {}", c.argv.join(" ")),
                min: c.min_severity,
                tx,
                dropped: AtomicU64::new(0),
            });
        }
        Sinks { queues }
    }

    /// Queue `e` for every sink it is severe enough for; never waits.
    pub fn offer(&self, e: &Arc<Event>) {
        for q in &self.queues {
            if e.severity < q.min {
                continue;
            }
            if q.tx.try_send(e.clone()).is_err() {
                let n = q.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // The first drop and every 100th after it: a stuck sink does not flood the log.
                if n == 1 || n.is_multiple_of(100) {
                    tracing::warn!(sink = %q.name, dropped = n, event = e.id, "event sink queue full: event dropped");
                }
            }
        }
    }

    /// Events each sink dropped (its name, the count).
    pub fn dropped(&self) -> Vec<(String, u64)> {
        self.queues
            .iter()
            .map(|q| (q.name.clone(), q.dropped.load(Ordering::Relaxed)))
            .collect()
    }
}

/// The delay before retry `n` (0-based): 1 s doubling, at most 60 s.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.min(6)).min(Duration::from_secs(60))
}

async fn run_webhook(sink: WebhookSink, mut rx: mpsc::Receiver<Arc<Event>>) {
    while let Some(e) = rx.recv().await {
        let body = match e.to_json() {
            Ok(b) => Bytes::from(b),
            Err(err) => {
                tracing::warn!(event = e.id, "encoding event: {err}");
                continue;
            }
        };
        let mut attempt = 0;
        loop {
            let secs = sink.timeout_secs.max(1);
            let r = match tokio::time::timeout(Duration::from_secs(secs), post(&sink, body.clone()))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(SinkError::Timeout {
                    url: sink.url.clone(),
                    secs,
                }),
            };
            match r {
                Ok(()) => break,
                Err(err) if attempt < sink.retries => {
                    let wait = backoff(attempt);
                    tracing::debug!(
                        event = e.id,
                        attempt,
                        "webhook failed, retrying in {wait:?}: {err}"
                    );
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                }
                Err(err) => {
                    tracing::warn!(
                        event = e.id,
                        attempts = attempt + 1,
                        "webhook gave up: {err}"
                    );
                    break;
                }
            }
        }
    }
}

/// A webhook URL's parts.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// https.
    pub tls: bool,
    /// Host name or address (no brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query (`/` at least).
    pub path: String,
}

/// Split `http[s]://HOST[:PORT][/PATH]`.
pub fn parse_url(url: &str) -> Result<Target, SinkError> {
    let bad = |why| SinkError::Url {
        url: url.to_owned(),
        why,
    };
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad("not http:// or https://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(bad("user information is not supported (use bearer-token)"));
    }
    let default = if tls { 443 } else { 80 };
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None if after.is_empty() => default,
            None => return Err(bad("bad port")),
        };
        (h.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad("bad port"))?),
            None => (authority.to_owned(), default),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(Target {
        tls,
        host,
        port,
        path: path.to_owned(),
    })
}

fn tls_config(ca_file: Option<&str>) -> Result<rustls::ClientConfig, SinkError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let path = ca_file.unwrap_or(SYSTEM_ROOTS);
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|source| SinkError::Roots {
        path: path.to_owned(),
        source,
    })?;
    for c in certs {
        let c = c.map_err(|source| SinkError::Roots {
            path: path.to_owned(),
            source,
        })?;
        // A certificate rustls cannot use as a root is skipped, as other clients do.
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(SinkError::NoRoots {
            path: path.to_owned(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| SinkError::Tls {
            host: String::new(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

async fn post(sink: &WebhookSink, body: Bytes) -> Result<(), SinkError> {
    let t = parse_url(&sink.url)?;
    let addr = format!("{}:{}", t.host, t.port);
    let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|source| SinkError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let host_header = if t.host.contains(':') {
        format!("[{}]:{}", t.host, t.port)
    } else {
        addr.clone()
    };
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(&t.path)
        .header(http::header::HOST, host_header)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("vmreplica/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(tok) = &sink.bearer_token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {tok}"));
    }
    let req = req
        .body(Full::new(body))
        .map_err(|source| SinkError::Request {
            url: sink.url.clone(),
            source,
        })?;
    let status = if t.tls {
        let cfg = tls_config(sink.ca_file.as_deref())?;
        let name = rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|_| {
            SinkError::ServerName {
                host: t.host.clone(),
            }
        })?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|source| SinkError::Handshake {
                addr: addr.clone(),
                source,
            })?;
        send(&sink.url, stream, req).await?
    } else {
        send(&sink.url, tcp, req).await?
    };
    if !status.is_success() {
        return Err(SinkError::Status {
            url: sink.url.clone(),
            status,
        });
    }
    Ok(())
}

async fn send<S>(
    url: &str,
    io: S,
    req: http::Request<Full<Bytes>>,
) -> Result<http::StatusCode, SinkError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |source| SinkError::Http {
        url: url.to_owned(),
        source,
    };
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(conn);
    let resp = tx.send_request(req).await.map_err(http)?;
    let status = resp.status();
    // Read the (small) answer to its end so that the connection closes cleanly.
    let _ = resp.into_body().collect().await;
    driver.abort();
    Ok(status)
}

async fn run_command_sink(sink: CommandSink, mut rx: mpsc::Receiver<Arc<Event>>) {
    while let Some(e) = rx.recv().await {
        if let Err(err) = run_command(&sink, &e).await {
            tracing::warn!(event = e.id, "event command: {err}");
        }
    }
}

/// Run the sink's command for one event.
pub async fn run_command(sink: &CommandSink, e: &Event) -> Result<(), SinkError> {
    let (program, args) = sink.argv.split_first().ok_or(SinkError::EmptyArgv)?;
    let spawn = |source| SinkError::Spawn {
        program: program.clone(),
        source,
    };
    let json = e.to_json().unwrap_or_default();
    let mut child = tokio::process::Command::new(Path::new(program))
        .args(args)
        .envs(e.env())
        .env("VMR_EVENT_JSON", &json)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn)?;
    let secs = sink.timeout_secs.max(1);
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its stdin is fine.
            let _ = stdin.write_all(json.as_bytes()).await;
            let _ = stdin.write_all(b"\n").await;
        }
        child.wait().await
    };
    let status = match tokio::time::timeout(Duration::from_secs(secs), run).await {
        Ok(s) => s.map_err(spawn)?,
        Err(_) => {
            let _ = child.kill().await;
            return Err(SinkError::CommandTimeout {
                program: program.clone(),
                secs,
            });
        }
    };
    if !status.success() {
        return Err(SinkError::CommandFailed {
            program: program.clone(),
            status,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_their_parts() {
        let t = |tls, host: &str, port, path: &str| Target {
            tls,
            host: host.into(),
            port,
            path: path.into(),
        };
        let table = [
            (
                "http://127.0.0.1:8080/hook",
                t(false, "127.0.0.1", 8080, "/hook"),
            ),
            (
                "https://alerts.example/a?b=c",
                t(true, "alerts.example", 443, "/a?b=c"),
            ),
            ("http://h", t(false, "h", 80, "/")),
            ("http://[::1]:81/x", t(false, "::1", 81, "/x")),
        ];
        for (url, want) in table {
            assert_eq!(parse_url(url).expect(url), want, "{url}");
        }
        for bad in [
            "ftp://h/",
            "http://",
            "http://h:port/",
            "http://u@h/",
            "http://[::1/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    fn event() -> Event {
        Event {
            version: vmr_proto::event::EVENT_FORMAT,
            id: 7,
            time_ms: 1,
            host: "h".into(),
            vm: None,
            kind: vmr_proto::event::EventKind::AgentStarted,
            severity: Severity::Info,
            message: "hello".into(),
            fields: Default::default(),
        }
    }

    /// A CA and a certificate it signed for `localhost`: (CA PEM, leaf DER, leaf key DER).
    fn pki() -> (String, Vec<u8>, Vec<u8>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).expect("ca");
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("leaf");
        (ca.pem(), leaf.der().to_vec(), key.serialize_der())
    }

    /// An https server on 127.0.0.1 answering one POST with `status`; the request it read.
    async fn https_server(status: u16) -> (u16, tokio::task::JoinHandle<Option<String>>, String) {
        use tokio::io::AsyncReadExt;
        let (ca, leaf, key) = pki();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .expect("server config");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let h = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.ok()?;
            let mut s = acceptor.accept(tcp).await.ok()?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        s.write_all(answer.as_bytes()).await.ok()?;
                        s.shutdown().await.ok()?;
                        return Some(text);
                    }
                }
            }
        });
        (port, h, ca)
    }

    fn sink(url: String, ca_file: Option<String>) -> WebhookSink {
        WebhookSink {
            url,
            bearer_token: Some("t0k".into()),
            min_severity: Severity::Info,
            queue: 1,
            timeout_secs: 10,
            retries: 0,
            ca_file,
        }
    }

    #[tokio::test]
    async fn an_https_webhook_gets_the_json_with_its_token_and_checks_the_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, server, ca) = https_server(200).await;
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca).expect("ca file");
        let s = sink(
            format!("https://localhost:{port}/hook"),
            Some(ca_path.display().to_string()),
        );
        let body = Bytes::from(event().to_json().expect("json"));
        post(&s, body.clone()).await.expect("post");
        let req = server.await.expect("join").expect("a request");
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        let lower = req.to_ascii_lowercase();
        assert!(lower.contains("authorization: bearer t0k"), "{req}");
        assert!(lower.contains("content-type: application/json"), "{req}");
        assert!(
            req.ends_with(std::str::from_utf8(&body).expect("utf8")),
            "{req}"
        );

        // A server this CA did not sign is refused (here: the system's roots do not know
        // the test CA, or there are none).
        let (port, _server, _) = https_server(200).await;
        let other = sink(format!("https://localhost:{port}/hook"), None);
        let e = post(&other, body.clone()).await.expect_err("untrusted");
        assert!(
            matches!(e, SinkError::Handshake { .. } | SinkError::Roots { .. }),
            "{e}"
        );
        // A non-2xx answer is an error (retried by the sink).
        let (port, server, ca) = https_server(503).await;
        std::fs::write(&ca_path, ca).expect("ca file");
        let s = sink(
            format!("https://localhost:{port}/hook"),
            Some(ca_path.display().to_string()),
        );
        let e = post(&s, body).await.expect_err("503");
        assert!(matches!(e, SinkError::Status { .. }), "{e}");
        let _ = server.await;
    }

    #[tokio::test]
    async fn a_command_gets_the_event_and_is_killed_at_its_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let cmd = |argv: Vec<String>, timeout_secs| CommandSink {
            argv,
            min_severity: Severity::Info,
            queue: 1,
            timeout_secs,
        };
        // The test's command is a shell on purpose; the sink itself runs argv directly.
        let script = format!(
            "cat > {0}; echo \"$VMR_EVENT_KIND $VMR_EVENT_ID $1\" >> {0}",
            out.display()
        );
        let c = cmd(
            vec![
                "/bin/sh".into(),
                "-c".into(),
                script,
                "sh".into(),
                "arg with spaces; not a shell".into(),
            ],
            10,
        );
        run_command(&c, &event()).await.expect("run");
        let text = std::fs::read_to_string(&out).expect("out");
        let mut lines = text.lines();
        let json: Event = serde_json::from_str(lines.next().expect("stdin")).expect("json");
        assert_eq!(json, event());
        assert_eq!(
            lines.next(),
            Some("agent-started 7 arg with spaces; not a shell")
        );
        let t = std::time::Instant::now();
        let e = run_command(&cmd(vec!["/bin/sleep".into(), "30".into()], 1), &event())
            .await
            .expect_err("timeout");
        assert!(matches!(e, SinkError::CommandTimeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        let e = run_command(&cmd(vec!["/bin/false".into()], 5), &event())
            .await
            .expect_err("fails");
        assert!(matches!(e, SinkError::CommandFailed { .. }), "{e}");
        let e = run_command(&cmd(vec![], 5), &event())
            .await
            .expect_err("empty");
        assert!(matches!(e, SinkError::EmptyArgv), "{e}");
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        let secs: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
