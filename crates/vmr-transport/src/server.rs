//! The HTTP/2 server side: accepting mutual-TLS connections within limits ([`ConnLimits`]:
//! connections per source address and in all, handshake and unauthorized-connection
//! deadlines, warnings rate-limited per source), authorizing the client certificate by
//! fingerprint, routing requests to the agent's [`Handler`] and mapping its typed errors to
//! HTTP responses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use vmr_proto::CycleHeader;
use vmr_proto::peer::{PEER_CONTENT_TYPE, PeerRequest, PeerResponse};
use vmr_proto::wire::{
    CycleAck, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_HEADER, PROTOCOL_VERSION, RemoteError,
};

use crate::error::{TransportError, error_chain};
use crate::frame::{CycleDecoder, ExtentStream};
use crate::identity::{Identity, fingerprint};
use crate::tls;

/// Route of cycle uploads.
pub(crate) const PATH_CYCLE: &str = "/v1/cycle";
/// Prefix of protocol-1 JSON control calls; the method name follows.
pub(crate) const PATH_CALL: &str = "/v1/call/";
/// Route of protocol-2 typed control calls.
pub(crate) const PATH_CALL_V2: &str = "/v2/call";
/// Route of the hello exchange.
pub(crate) const PATH_HELLO: &str = "/v1/hello";
/// Largest JSON request or response body.
pub(crate) const MAX_JSON_BODY: usize = 1 << 20;
/// HTTP/2 flow-control windows: how much of a stream may be in flight unconsumed.
pub(crate) const STREAM_WINDOW: u32 = 4 << 20;
pub(crate) const CONN_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame this side accepts: a whole 1 MiB extent payload fits in one DATA frame
/// (`frame::DATA_CHUNK`), which the cycle decoder hands on without copying it.
pub(crate) const MAX_FRAME: u32 = 1 << 20;
const KEEPALIVE: Duration = Duration::from_secs(5);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bounds on the connections a server holds before their certificate is authorized, so that
/// clients without an authorized certificate cannot exhaust its file descriptors or its log.
/// Authorized connections (a primary keeps one per replicated VM) do not count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections not (yet) authorized held at the same time from one source address (more
    /// are closed at once, before TLS).
    pub per_source: usize,
    /// Connections not (yet) authorized held at the same time in all.
    pub total: usize,
    /// A client must complete the TLS handshake within this time.
    pub handshake_timeout: Duration,
    /// A connection whose certificate is not authorized is answered `403` and closed after
    /// this time.
    pub unauthorized_linger: Duration,
    /// Warnings of one kind (refused connection, failed handshake, unknown certificate) about
    /// one source address are logged at most once per this period, with the number
    /// suppressed.
    pub warn_every: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            per_source: 64,
            total: 512,
            handshake_timeout: Duration::from_secs(10),
            unauthorized_linger: Duration::from_secs(5),
            warn_every: Duration::from_secs(60),
        }
    }
}

/// Counts of the connections held before authorization, by source address.
#[derive(Debug, Default)]
struct ConnCounts {
    by_source: HashMap<IpAddr, usize>,
    total: usize,
}

/// A connection's place in [`ConnCounts`] until it is authorized, given back when dropped.
struct ConnSlot {
    counts: Arc<Mutex<ConnCounts>>,
    source: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
    }
}

/// Takes a slot for a connection from `source`, or says which limit is reached.
fn take_slot(
    counts: &Arc<Mutex<ConnCounts>>,
    limits: &ConnLimits,
    source: IpAddr,
) -> Result<ConnSlot, &'static str> {
    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
    if c.total >= limits.total {
        return Err("too many connections");
    }
    let n = c.by_source.entry(source).or_insert(0);
    if *n >= limits.per_source {
        return Err("too many connections from this address");
    }
    *n += 1;
    c.total += 1;
    Ok(ConnSlot {
        counts: counts.clone(),
        source,
    })
}

/// Rate limit of warnings per source address and kind of warning: the first of a period is
/// logged, the rest are counted and reported with the next one logged.
#[derive(Debug)]
struct WarnLimiter {
    every: Duration,
    seen: Mutex<HashMap<WarnKey, (Instant, u64)>>,
}

/// A source address and the kind of warning (its message).
type WarnKey = (IpAddr, &'static str);

/// Most sources the limiter remembers; older entries are forgotten first.
const WARN_SOURCES: usize = 4096;

impl WarnLimiter {
    fn new(every: Duration) -> WarnLimiter {
        WarnLimiter {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` when a warning of `kind` about `source` at `now` is to be logged
    /// (with the number of such warnings suppressed since the last one logged), `None` to
    /// suppress it.
    fn check(&self, source: IpAddr, kind: &'static str, now: Instant) -> Option<u64> {
        let source = (source, kind);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= WARN_SOURCES && !seen.contains_key(&source) {
            let every = self.every;
            seen.retain(|_, (at, _)| now.saturating_duration_since(*at) < every);
            if seen.len() >= WARN_SOURCES {
                return None;
            }
        }
        match seen.get_mut(&source) {
            Some((at, n)) if now.saturating_duration_since(*at) < self.every => {
                *n += 1;
                None
            }
            Some((at, n)) => {
                let suppressed = *n;
                *at = now;
                *n = 0;
                Some(suppressed)
            }
            None => {
                seen.insert(source, (now, 0));
                Some(0)
            }
        }
    }
}

/// Logs the warning `msg` about `remote` unless one of the same kind (`msg`'s text) about its
/// source was logged within the period.
macro_rules! warn_limited {
    ($limiter:expr, $remote:expr, $($field:ident = $value:expr,)* $msg:literal) => {
        if let Some(suppressed) = $limiter.check($remote.ip(), $msg, Instant::now()) {
            tracing::warn!(remote = %$remote, suppressed, $($field = $value,)* $msg);
        }
    };
}

/// An authorized peer agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's configured name.
    pub name: String,
    /// Its pinned certificate fingerprint.
    pub fingerprint: String,
    /// Its trust group, if any.
    pub trust_group: Option<String>,
    /// The address its connection comes from (set by the server for every request; `None`
    /// in what an [`Authorize`] returns).
    pub remote: Option<SocketAddr>,
}

/// Decides whether a client certificate fingerprint belongs to a known peer.
pub trait Authorize: Send + Sync + 'static {
    /// The peer owning `fingerprint`, or `None` to refuse it.
    fn authorize(&self, fingerprint: &str) -> Option<Peer>;
}

/// A fixed list of peers, authorized by exact fingerprint.
#[derive(Debug, Clone, Default)]
pub struct PeerList(pub Vec<Peer>);

impl Authorize for PeerList {
    fn authorize(&self, fingerprint: &str) -> Option<Peer> {
        self.0
            .iter()
            .find(|p| p.fingerprint == fingerprint)
            .cloned()
    }
}

/// What the agent does with authorized requests.
pub trait Handler: Send + Sync + 'static {
    /// Receives one cycle. `extents` yields verified extents lazily as the body arrives; it
    /// yields `None` only after the End frame verified. On any `Err` item the handler must
    /// discard what it staged and return an error (see [`TransportError::to_remote`]).
    fn receive_cycle(
        &self,
        peer: &Peer,
        header: CycleHeader,
        extents: ExtentStream,
    ) -> impl Future<Output = Result<CycleAck, RemoteError>> + Send;

    /// Answers a control call. The answer must be of the request's variant (the server refuses
    /// anything else with an `internal` error). Calls of protocol-1 callers arrive here already
    /// mapped onto the typed request.
    fn call(
        &self,
        peer: &Peer,
        req: PeerRequest,
    ) -> impl Future<Output = Result<PeerResponse, RemoteError>> + Send;
}

/// A bound, not yet running agent server.
pub struct Server<H: Handler> {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    authorizer: Arc<dyn Authorize>,
    handler: Arc<H>,
    local_addr: SocketAddr,
    limits: ConnLimits,
}

impl<H: Handler> std::fmt::Debug for Server<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> Server<H> {
    /// Binds `addr` (port 0 picks a free port) with `identity` as server certificate.
    pub async fn bind(
        addr: SocketAddr,
        identity: &Identity,
        authorizer: Arc<dyn Authorize>,
        handler: Arc<H>,
    ) -> Result<Server<H>, TransportError> {
        let cfg = tls::server_config(identity)?;
        let connect_err = |source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(connect_err)?;
        let local_addr = listener.local_addr().map_err(connect_err)?;
        Ok(Server {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
            authorizer,
            handler,
            local_addr,
            limits: ConnLimits::default(),
        })
    }

    /// Replaces the connection limits (default [`ConnLimits::default`]).
    pub fn with_limits(mut self, limits: ConnLimits) -> Server<H> {
        self.limits = limits;
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves connections until `shutdown` completes, then stops accepting, lets running
    /// requests finish for a short grace period and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), TransportError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        let counts = Arc::new(Mutex::new(ConnCounts::default()));
        let warn = Arc::new(WarnLimiter::new(self.limits.warn_every));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok((tcp, remote)) => {
                        let source = remote.ip().to_canonical();
                        let slot = match take_slot(&counts, &self.limits, source) {
                            Ok(s) => s,
                            Err(why) => {
                                // Closed at once: no handshake, no task.
                                drop(tcp);
                                warn_limited!(warn, remote, "connection refused: {why}");
                                continue;
                            }
                        };
                        let _ = tcp.set_nodelay(true);
                        conns.spawn(serve_conn(
                            tcp,
                            remote,
                            Conn {
                                acceptor: self.acceptor.clone(),
                                authorizer: self.authorizer.clone(),
                                limits: self.limits.clone(),
                                warn: warn.clone(),
                                slot: Some(slot),
                            },
                            self.handler.clone(),
                            stop_rx.clone(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        let _ = stop_tx.send(true);
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            conns.abort_all();
        }
        Ok(())
    }
}

/// What a connection's task needs besides the socket and handler; holds its slot until the
/// connection is authorized.
struct Conn {
    acceptor: TlsAcceptor,
    authorizer: Arc<dyn Authorize>,
    limits: ConnLimits,
    warn: Arc<WarnLimiter>,
    slot: Option<ConnSlot>,
}

async fn serve_conn<H: Handler>(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    mut c: Conn,
    handler: Arc<H>,
    mut stop: watch::Receiver<bool>,
) {
    let accept = tokio::time::timeout(c.limits.handshake_timeout, c.acceptor.accept(tcp));
    let tls = match accept.await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn_limited!(
                c.warn,
                remote,
                error = tracing::field::display(&e),
                "tls handshake failed"
            );
            return;
        }
        Err(_) => {
            warn_limited!(c.warn, remote, "tls handshake timed out");
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(tls::ALPN_H2) {
        warn_limited!(c.warn, remote, "client did not negotiate h2");
        return;
    }
    let authorizer = &c.authorizer;
    let fp = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| fingerprint(c));
    let peer = fp
        .as_deref()
        .and_then(|f| authorizer.authorize(f))
        .map(|p| Peer {
            remote: Some(SocketAddr::new(remote.ip().to_canonical(), remote.port())),
            ..p
        });
    match &peer {
        Some(p) => {
            tracing::debug!(%remote, peer = %p.name, "peer connected");
            // Authorized: no longer counted against the limits.
            c.slot = None;
        }
        None => warn_limited!(
            c.warn,
            remote,
            fingerprint = fp.as_deref().unwrap_or("-"),
            "unknown client certificate refused"
        ),
    }
    // An unauthorized client is answered 403 (so that it learns why) for a short while only.
    let linger = match &peer {
        Some(_) => None,
        None => Some(c.limits.unauthorized_linger),
    };
    // Authorized again for every request, so that a revoked entry (`server deny`) stops the
    // next request of a connection already open, not only new connections.
    let fp: Arc<Option<String>> = Arc::new(fp);
    let authorizer = c.authorizer.clone();
    let from = SocketAddr::new(remote.ip().to_canonical(), remote.port());
    let svc = service_fn(move |req| {
        let peer = Arc::new(
            (*fp)
                .as_deref()
                .and_then(|f| authorizer.authorize(f))
                .map(|p| Peer {
                    remote: Some(from),
                    ..p
                }),
        );
        let handler = handler.clone();
        async move {
            // The request runs in its own task: if the client resets the stream, hyper drops
            // this future, but the handler still runs to completion and sees its extent stream
            // fail (Interrupted) instead of being cancelled mid-way.
            let task =
                tokio::spawn(
                    async move { route(req, peer.as_ref().as_ref(), handler.as_ref()).await },
                );
            let resp = task.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "request handler failed");
                error_response(&RemoteError::Internal {
                    message: "handler panicked".into(),
                })
            });
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(KEEPALIVE))
        .keep_alive_timeout(KEEPALIVE)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(64);
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let expired = async {
        match linger {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = conn.as_mut() => match r {
            Ok(()) => tracing::debug!(%remote, "connection closed"),
            Err(e) => tracing::debug!(%remote, error = %e, "connection ended"),
        },
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        () = expired => {
            tracing::debug!(%remote, "unauthorized connection closed");
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

type RespBody = Full<Bytes>;

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<RespBody> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &RemoteError) -> Response<RespBody> {
    let status = StatusCode::from_u16(e.status_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, e)
}

fn bad_request(message: impl Into<String>) -> Response<RespBody> {
    error_response(&RemoteError::BadRequest {
        message: message.into(),
    })
}

/// The protocol version a request carries, if it is one this build speaks.
fn request_version(req: &Request<Incoming>) -> Result<u16, RemoteError> {
    let got = req
        .headers()
        .get(PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u16>().ok());
    match got {
        Some(v) if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v) => Ok(v),
        got => Err(RemoteError::ProtocolVersion {
            got,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        }),
    }
}

async fn route<H: Handler>(
    req: Request<Incoming>,
    peer: Option<&Peer>,
    handler: &H,
) -> Response<RespBody> {
    let Some(peer) = peer else {
        return error_response(&RemoteError::Unauthorized);
    };
    let version = match request_version(&req) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(peer = %peer.name, error = %e, "request refused");
            return error_response(&e);
        }
    };
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, PATH_HELLO) => json_response(
            StatusCode::OK,
            &Hello {
                protocol: version,
                software: env!("CARGO_PKG_VERSION").to_string(),
                peer_name: peer.name.clone(),
                trust_group: peer.trust_group.clone(),
            },
        ),
        (&Method::POST, PATH_CYCLE) => receive_cycle(req, peer, handler).await,
        (&Method::POST, PATH_CALL_V2) => {
            let body = match read_call_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let call = match PeerRequest::decode(&body) {
                Ok(c) => c,
                Err(e) => {
                    return bad_request(format!("bad call body: {}", error_chain(&e)));
                }
            };
            match answer(handler, peer, call).await {
                Ok(resp) => {
                    let mut r = Response::new(Full::new(Bytes::from(resp.encode())));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(PEER_CONTENT_TYPE),
                    );
                    r
                }
                Err(e) => error_response(&e),
            }
        }
        (&Method::POST, p) if p.starts_with(PATH_CALL) => {
            // A protocol-1 caller: its JSON call is mapped onto the typed request and the
            // typed answer back onto the JSON it expects.
            let method = p[PATH_CALL.len()..].to_string();
            if !valid_method(&method) {
                return bad_request(format!("invalid method name {method:?}"));
            }
            let body = match read_call_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let value: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return bad_request(format!("call body is not json: {e}")),
            };
            let call = match PeerRequest::from_v1(&method, value) {
                Ok(c) => c,
                Err(e) => {
                    return bad_request(format!("{method}: {}", error_chain(&e)));
                }
            };
            match answer(handler, peer, call).await {
                Ok(resp) => json_response(StatusCode::OK, &resp.to_v1()),
                Err(e) => error_response(&e),
            }
        }
        _ => {
            let mut r = bad_request(format!("no route {} {path}", req.method()));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

async fn read_call_body(req: Request<Incoming>) -> Result<Bytes, Response<RespBody>> {
    match Limited::new(req.into_body(), MAX_JSON_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(bad_request(format!("cannot read call body: {e}"))),
    }
}

/// Runs the handler and checks that its answer is of the request's variant.
async fn answer<H: Handler>(
    handler: &H,
    peer: &Peer,
    call: PeerRequest,
) -> Result<PeerResponse, RemoteError> {
    let method = call.method();
    let resp = handler.call(peer, call).await?;
    if resp.method() != method {
        tracing::error!(peer = %peer.name, method, answer = resp.method(), "handler answered another call");
        return Err(RemoteError::Internal {
            message: format!("the handler answered {} to {method}", resp.method()),
        });
    }
    Ok(resp)
}

/// Method names: 1..=64 chars of `[A-Za-z0-9._-]`.
pub(crate) fn valid_method(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 64
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

async fn receive_cycle<H: Handler>(
    req: Request<Incoming>,
    peer: &Peer,
    handler: &H,
) -> Response<RespBody> {
    let chunks = req
        .into_body()
        .into_data_stream()
        .map(|r| {
            r.map_err(|e| TransportError::Interrupted {
                during: "request body",
                cause: Box::new(e),
            })
        })
        .boxed();
    let (header, dec) = match CycleDecoder::start(chunks).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(peer = %peer.name, error = %e, "cycle refused before its header");
            return error_response(&e.to_remote());
        }
    };
    let (vm, id) = (header.vm, header.id);
    let (extents, verified) = ExtentStream::from_decoder(dec);
    match handler.receive_cycle(peer, header, extents).await {
        Ok(ack) if verified.load(Ordering::SeqCst) => json_response(StatusCode::OK, &ack),
        Ok(_) => {
            tracing::error!(peer = %peer.name, %vm, cycle = id, "handler acknowledged an unverified cycle");
            error_response(&RemoteError::Internal {
                message: "handler acknowledged a cycle before its end frame verified".into(),
            })
        }
        Err(e) => {
            tracing::warn!(peer = %peer.name, %vm, cycle = id, error = %e, "cycle rejected");
            error_response(&e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn slots_are_capped_per_source_and_in_all_and_given_back() {
        let limits = ConnLimits {
            per_source: 2,
            total: 3,
            ..ConnLimits::default()
        };
        let counts = Arc::new(Mutex::new(ConnCounts::default()));
        let a1 = take_slot(&counts, &limits, ip("10.0.0.1")).expect("a1");
        let a2 = take_slot(&counts, &limits, ip("10.0.0.1")).expect("a2");
        assert!(
            take_slot(&counts, &limits, ip("10.0.0.1")).is_err(),
            "per source"
        );
        let b1 = take_slot(&counts, &limits, ip("10.0.0.2")).expect("b1");
        assert!(
            take_slot(&counts, &limits, ip("10.0.0.3")).is_err(),
            "in all"
        );
        drop(a1);
        let a3 = take_slot(&counts, &limits, ip("10.0.0.1")).expect("a slot given back");
        drop((a2, a3, b1));
        let c = counts.lock().expect("lock");
        assert_eq!(c.total, 0);
        assert!(c.by_source.is_empty());
    }

    #[test]
    fn warnings_are_limited_per_source_and_kind_with_a_count() {
        let w = WarnLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert_eq!(w.check(a, "k", t0), Some(0));
        for i in 1..=499u64 {
            assert_eq!(w.check(a, "k", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(w.check(b, "k", t0), Some(0), "another source is logged");
        assert_eq!(w.check(a, "other", t0), Some(0), "another kind is logged");
        assert_eq!(
            w.check(a, "k", t0 + Duration::from_secs(61)),
            Some(499),
            "the next period logs the count suppressed"
        );
        assert_eq!(w.check(a, "k", t0 + Duration::from_secs(62)), None);
    }

    #[test]
    fn the_limiter_forgets_old_sources_first() {
        let w = WarnLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..WARN_SOURCES as u32 {
            assert_eq!(w.check(IpAddr::from(i.to_be_bytes()), "k", t0), Some(0));
        }
        // Full of recent sources: a new one is suppressed; once they are old, it is logged.
        assert_eq!(w.check(ip("192.0.2.1"), "k", t0), None);
        assert_eq!(
            w.check(ip("192.0.2.1"), "k", t0 + Duration::from_secs(61)),
            Some(0)
        );
        assert!(w.seen.lock().expect("lock").len() < 10);
    }
}
