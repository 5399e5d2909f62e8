//! The HTTP/2 client side: one pinned mutual-TLS connection to a peer agent, over which cycles
//! are streamed and JSON control calls are made, several at a time.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use http::{Method, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use uuid::Uuid;
use vmr_proto::api::{
    BecomeReplica, BlockHashesRequest, CreateReplica, ReplicaVmInfo, ReplicationState,
};
use vmr_proto::lease::{PromiseResponse, WitnessRequest, WitnessResponse};
use vmr_proto::peer::{
    BecameReplica, BlockHashes, ContinueFromRequest, ContinuedFrom, PEER_CONTENT_TYPE, PeerRequest,
    PeerResponse, PrimaryVmState, ReplicaInfoRequest, SourceVmState,
};
use vmr_proto::wire::{
    CycleAck, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_HEADER, PROTOCOL_VERSION, RemoteError,
};
use vmr_proto::{CycleHeader, Extent};

use crate::error::{ProtocolFault, TransportError};
use crate::frame::{
    CHUNK, DATA_CHUNK, FrameEncoder, STREAM_V2_SINCE, STREAM_VERSION, STREAM_VERSION_1,
};
use crate::identity::Identity;
use crate::pace::Pace;
use crate::server::{
    CONN_WINDOW, MAX_FRAME, MAX_JSON_BODY, PATH_CALL, PATH_CALL_V2, PATH_CYCLE, PATH_HELLO,
    STREAM_WINDOW,
};
use crate::tls;

/// Content type of cycle bodies.
const CYCLE_CONTENT_TYPE: &str = "application/vnd.vmreplica.cycle";
/// How much of a cycle body may be queued between the encoder and HTTP/2, and in what chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyQueue {
    /// 32 chunks, extent payloads in chunks of up to 1 MiB (one HTTP/2 DATA frame each, which
    /// the receiver hands on without copying): about 16 MiB with 1 MiB extents (a chunk of
    /// frame headers and one of data each), at most 32 MiB. The encoder hashes the next extents
    /// while HTTP/2 encrypts and sends the ones before (a primary's cycles and resyncs).
    Ahead,
    /// 4 chunks of at most 256 KiB, 1 MiB: for a sender that yields to other work on its host
    /// (an extended relationship's forwarder, which waits while a cycle streams in from
    /// upstream), so that a pause of its producer takes effect on the wire at once.
    Yielding,
}

impl BodyQueue {
    fn chunks(self) -> usize {
        match self {
            BodyQueue::Ahead => 32,
            BodyQueue::Yielding => 4,
        }
    }

    /// Largest chunk of an extent's payload.
    fn data_chunk(self) -> usize {
        match self {
            BodyQueue::Ahead => DATA_CHUNK,
            BodyQueue::Yielding => CHUNK,
        }
    }
}

/// Client tuning.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bound on TCP connect + TLS handshake + hello.
    pub connect_timeout: Duration,
    /// Bound on one [`Client::call`].
    pub call_timeout: Duration,
    /// HTTP/2 ping interval; a peer silent for as long again is considered gone.
    pub keepalive: Duration,
    /// zstd level used when a cycle is sent compressed.
    pub zstd_level: i32,
    /// The protocol version offered in the hello (default [`PROTOCOL_VERSION`]); the connection
    /// speaks the version the server answers, which must lie between [`MIN_PROTOCOL_VERSION`]
    /// and this one. Lower it to talk like an older agent.
    pub protocol: u16,
    /// The local address outgoing connections come from (`None`: the system's choice). An
    /// agent listening on a specific address binds to it, so that its peers see the address
    /// it listens on.
    pub bind: Option<std::net::IpAddr>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(5),
            zstd_level: 1,
            protocol: PROTOCOL_VERSION,
            bind: None,
        }
    }
}

type ReqBody = UnsyncBoxBody<Bytes, BodyAborted>;

/// A cycle body whose producer failed: the request stream is reset, so that the peer sees an
/// interrupted transfer (retryable) rather than a body its sender ended early (a 400).
#[derive(Debug, thiserror::Error)]
#[error("the cycle's producer failed")]
struct BodyAborted;

/// A complete body.
fn full_body(b: Bytes) -> ReqBody {
    Full::new(b)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection to one peer agent. Cheap to clone; clones share the connection and may run
/// requests concurrently (one HTTP/2 stream each). The connection closes when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Client {
    sender: http2::SendRequest<ReqBody>,
    authority: String,
    opts: ClientOptions,
    hello: Hello,
    _conn: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// hyper's error while `during`: a keepalive timeout, or an interruption with its cause.
fn map_hyper(during: &'static str) -> impl Fn(hyper::Error) -> TransportError {
    move |e| {
        if e.is_timeout() {
            return TransportError::Timeout("http/2 keepalive");
        }
        TransportError::Interrupted {
            during,
            cause: Box::new(e),
        }
    }
}

fn map_tls(
    e: std::io::Error,
    addr: &str,
    verifier: &tls::PinnedServerVerifier,
    expected: &str,
) -> TransportError {
    let seen = verifier.seen.lock().ok().and_then(|s| s.clone());
    if let Some(got) = seen
        && got != expected
    {
        return TransportError::PeerFingerprint {
            expected: expected.into(),
            got,
        };
    }
    let is_tls = e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
    if is_tls {
        let kind = e.kind();
        if let Some(inner) = e.into_inner() {
            return match inner.downcast::<rustls::Error>() {
                Ok(r) => TransportError::Tls(*r),
                Err(other) => TransportError::Connect {
                    addr: addr.into(),
                    source: std::io::Error::new(kind, other),
                },
            };
        }
        // `get_ref` saw an inner error, so `into_inner` returned it: not reached.
        return TransportError::Connect {
            addr: addr.into(),
            source: std::io::Error::from(kind),
        };
    }
    TransportError::Connect {
        addr: addr.into(),
        source: e,
    }
}

/// TCP connection to `addr` (`host:port`; every address it resolves to is tried in turn),
/// from `bind` when given and usable for that target: a loopback source is used only towards
/// loopback targets, one of the other family not at all, and a source that is no longer an
/// address of this host (bind fails) falls back to the system's choice.
async fn connect_tcp(addr: &str, bind: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(local) = bind.filter(|ip| !ip.is_unspecified()) else {
        return TcpStream::connect(addr).await;
    };
    let mut last = None;
    for target in tokio::net::lookup_host(addr).await? {
        let usable = target.is_ipv4() == local.is_ipv4()
            && (!local.is_loopback() || target.ip().is_loopback());
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if usable && let Err(e) = socket.bind(std::net::SocketAddr::new(local, 0)) {
            tracing::debug!(%local, error = %e, "cannot connect from the listen address");
            return TcpStream::connect(target).await;
        }
        match socket.connect(target).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    }))
}

impl Client {
    /// Connects to `addr` (`host:port`), presenting `identity` and accepting only a server whose
    /// certificate has `expected_fingerprint`, then exchanges hellos (which also checks that the
    /// server authorizes us: otherwise `Remote(Unauthorized)`).
    pub async fn connect(
        addr: &str,
        identity: &Identity,
        expected_fingerprint: &str,
        opts: ClientOptions,
    ) -> Result<Client, TransportError> {
        let (cfg, verifier) = tls::client_config(identity, expected_fingerprint)?;
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string())
            .or_else(|_| ServerName::try_from("vmreplica".to_string()))
            .map_err(|source| TransportError::BadHost {
                host: host.to_string(),
                source,
            })?;
        let keepalive = opts.keepalive;
        let bind = opts.bind;
        let setup = async {
            let tcp = connect_tcp(addr, bind)
                .await
                .map_err(|source| TransportError::Connect {
                    addr: addr.into(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(Arc::new(cfg))
                .connect(server_name, tcp)
                .await
                .map_err(|e| map_tls(e, addr, &verifier, expected_fingerprint))?;
            if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
                return Err(TransportError::Protocol(ProtocolFault::NoH2));
            }
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(keepalive))
                .keep_alive_timeout(keepalive)
                .keep_alive_while_idle(true)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONN_WINDOW)
                .max_frame_size(MAX_FRAME);
            let (sender, conn) = builder
                .handshake(TokioIo::new(tls))
                .await
                .map_err(map_hyper("http/2 handshake"))?;
            let task = tokio::spawn(async move {
                match conn.await {
                    Ok(()) => tracing::debug!("peer connection closed"),
                    Err(e) => tracing::debug!(error = %e, "peer connection ended"),
                }
            });
            Ok::<_, TransportError>((sender, AbortOnDrop(task)))
        };
        let offered = opts.protocol;
        let (sender, conn) = tokio::time::timeout(opts.connect_timeout, setup)
            .await
            .map_err(|_| TransportError::Timeout("connect"))??;
        let mut client = Client {
            sender,
            authority: addr.to_string(),
            opts,
            hello: Hello {
                protocol: offered,
                software: String::new(),
                peer_name: String::new(),
                trust_group: None,
            },
            _conn: Arc::new(conn),
        };
        let req = client
            .request_builder(Method::GET, PATH_HELLO)
            .body(empty_body());
        let req = req.map_err(TransportError::BuildRequest)?;
        let hello = tokio::time::timeout(client.opts.connect_timeout, async {
            let resp = client.send(req).await?;
            read_json::<Hello>(resp).await
        })
        .await
        .map_err(|_| TransportError::Timeout("hello"))??;
        if !(MIN_PROTOCOL_VERSION..=offered).contains(&hello.protocol) {
            return Err(TransportError::Protocol(ProtocolFault::HelloVersion {
                answered: hello.protocol,
                min: MIN_PROTOCOL_VERSION,
                max: offered,
            }));
        }
        client.hello = hello;
        Ok(client)
    }

    /// The server's hello: the protocol version this connection speaks and the name/trust group
    /// the server knows us by.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// True once the connection is closed (then reconnect).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    fn request_builder(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.authority))
            .header(PROTOCOL_HEADER, self.hello.protocol.to_string())
    }

    async fn send(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, TransportError> {
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(map_hyper("connection"))?;
        sender.send_request(req).await.map_err(map_hyper("request"))
    }

    /// Streams one cycle to the peer: the body is produced from `extents` as HTTP/2 flow control
    /// allows (a few 256 KiB chunks queued at most), zstd-compressed when `compress`. Returns the
    /// peer's acknowledgement once it verified and staged the whole cycle.
    pub async fn send_cycle<S, E>(
        &self,
        header: &CycleHeader,
        extents: S,
        compress: bool,
    ) -> Result<CycleAck, TransportError>
    where
        S: Stream<Item = Result<Extent, E>> + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.send_cycle_paced(header, extents, compress, None, BodyQueue::Ahead)
            .await
    }

    /// [`Client::send_cycle`] under a sending limit: before each encoded chunk of the body
    /// (after compression and framing) goes to HTTP/2, `pace` says how long to wait; `queue` bounds
    /// what waits between the encoder and HTTP/2.
    pub async fn send_cycle_paced<S, E>(
        &self,
        header: &CycleHeader,
        extents: S,
        compress: bool,
        pace: Option<Arc<dyn Pace>>,
        queue: BodyQueue,
    ) -> Result<CycleAck, TransportError>
    where
        S: Stream<Item = Result<Extent, E>> + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (tx, rx) = mpsc::channel::<Bytes>(queue.chunks());
        // The body ends cleanly only after the End frame was queued; when the producer fails,
        // it ends with an error instead (the stream is reset). `hold` keeps the channel open
        // until the producer decided which.
        let hold = tx.clone();
        let finished = Arc::new(AtomicBool::new(false));
        let seen = finished.clone();
        let tail = futures::stream::once(async move {
            (!seen.load(Ordering::SeqCst)).then_some(Err(BodyAborted))
        })
        .filter_map(futures::future::ready);
        let paced = rx.then(move |b| {
            let pace = pace.clone();
            async move {
                if let Some(p) = pace {
                    let wait = p.reserve(b.len() as u64);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                Ok(Frame::data(b))
            }
        });
        let body = StreamBody::new(paced.chain(tail)).boxed_unsync();
        let req = self
            .request_builder(Method::POST, PATH_CYCLE)
            .header(http::header::CONTENT_TYPE, CYCLE_CONTENT_TYPE)
            .body(body)
            .map_err(TransportError::BuildRequest)?;
        let level = compress.then_some(self.opts.zstd_level);
        let version = if self.hello.protocol >= STREAM_V2_SINCE {
            STREAM_VERSION
        } else {
            STREAM_VERSION_1
        };
        let producer = async move {
            let mut enc =
                FrameEncoder::start(tx, header, level, version, queue.data_chunk()).await?;
            futures::pin_mut!(extents);
            while let Some(e) = extents.next().await {
                enc.extent(e.map_err(|e| TransportError::Source(e.into()))?)
                    .await?;
            }
            enc.finish().await?;
            finished.store(true, Ordering::SeqCst);
            drop(hold);
            Ok(())
        };
        let response = self.send(req);
        futures::pin_mut!(producer, response);
        let resp = tokio::select! {
            r = &mut producer => match r {
                // Body closed under us: the peer answered early or the connection died; the
                // response says which.
                Ok(()) | Err(TransportError::BodyClosed) => response.await,
                // Our side failed: the body ends with an error (the stream is reset), which
                // the peer sees as an interrupted transfer.
                Err(e) => return Err(e),
            },
            r = &mut response => r,
        }?;
        read_json::<CycleAck>(resp).await
    }

    /// Sends a pre-encoded cycle body as is (tests of the receiver's checks).
    #[doc(hidden)]
    pub async fn send_raw_cycle(&self, body: Bytes) -> Result<CycleAck, TransportError> {
        let req = self
            .request_builder(Method::POST, PATH_CYCLE)
            .header(http::header::CONTENT_TYPE, CYCLE_CONTENT_TYPE)
            .body(full_body(body))
            .map_err(TransportError::BuildRequest)?;
        let resp = self.send(req).await?;
        read_json(resp).await
    }

    /// Posts `body` to `path` with the given protocol header (none if `None`) and returns the
    /// success body (tests of the server's checks and of protocol-1 callers).
    #[doc(hidden)]
    pub async fn send_raw_call(
        &self,
        path: &str,
        version: Option<u16>,
        content_type: &str,
        body: Bytes,
    ) -> Result<Bytes, TransportError> {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(format!("https://{}{path}", self.authority))
            .header(http::header::CONTENT_TYPE, content_type);
        if let Some(v) = version {
            b = b.header(PROTOCOL_HEADER, v.to_string());
        }
        let req = b
            .body(full_body(body))
            .map_err(TransportError::BuildRequest)?;
        read_body(self.send(req).await?).await
    }

    /// Makes a control call and returns the peer's answer (of the request's variant). Speaks the
    /// connection's protocol version: typed bodies on `/v2/call`, or the version-1 JSON call
    /// `/v1/call/{method}` to an older peer.
    pub async fn call(&self, req: PeerRequest) -> Result<PeerResponse, TransportError> {
        let (path, content_type, body) = if self.hello.protocol >= 2 {
            (PATH_CALL_V2.to_string(), PEER_CONTENT_TYPE, req.encode())
        } else {
            let (method, value) = req.to_v1();
            let json = serde_json::to_vec(&value).map_err(|source| TransportError::Encode {
                what: "call body",
                source,
            })?;
            (format!("{PATH_CALL}{method}"), "application/json", json)
        };
        let http_req = self
            .request_builder(Method::POST, &path)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(full_body(Bytes::from(body)))
            .map_err(TransportError::BuildRequest)?;
        let bad = |error: vmr_proto::peer::PeerCodecError| {
            TransportError::Protocol(ProtocolFault::BadAnswer {
                method: req.method(),
                error,
            })
        };
        tokio::time::timeout(self.opts.call_timeout, async {
            let resp = self.send(http_req).await?;
            let body = read_body(resp).await?;
            let answer = if self.hello.protocol >= 2 {
                PeerResponse::decode(&body).map_err(bad)?
            } else {
                let v = serde_json::from_slice(&body)
                    .map_err(|e| TransportError::Protocol(ProtocolFault::ResponseJson(e)))?;
                PeerResponse::from_v1(&req, v).map_err(bad)?
            };
            answer.answering(&req).map_err(bad)
        })
        .await
        .map_err(|_| TransportError::Timeout("call"))?
    }

    /// `create-replica`: true if the replica VM was created, false if it existed (refreshed).
    ///
    /// Continuous mode (frequency [`vmr_proto::api::FREQUENCY_CONTINUOUS`]) is refused with
    /// [`TransportError::PeerTooOld`], without a request, on a connection older than
    /// [`vmr_proto::wire::CONTINUOUS_SINCE`]: such a replica would take 0 s for an interval.
    pub async fn create_replica(&self, req: CreateReplica) -> Result<bool, TransportError> {
        if req.frequency_secs == vmr_proto::api::FREQUENCY_CONTINUOUS
            && self.hello.protocol < vmr_proto::wire::CONTINUOUS_SINCE
        {
            return Err(TransportError::PeerTooOld {
                what: "continuous mode (--frequency continuous)",
                peer: self.hello.protocol,
                needs: vmr_proto::wire::CONTINUOUS_SINCE,
            });
        }
        match self.call(PeerRequest::CreateReplica(req)).await? {
            PeerResponse::CreateReplica { created } => Ok(created),
            other => Err(unexpected(&other)),
        }
    }

    /// `replica-info`: the replica's view of VM `uuid`; `listen` is our listen address, which
    /// the replica remembers for its split-brain probe.
    pub async fn replica_info(
        &self,
        uuid: Uuid,
        listen: Option<String>,
    ) -> Result<ReplicaVmInfo, TransportError> {
        let req = PeerRequest::ReplicaInfo(ReplicaInfoRequest { uuid, listen });
        match self.call(req).await? {
            PeerResponse::ReplicaInfo(i) => Ok(i),
            other => Err(unexpected(&other)),
        }
    }

    /// `primary-vm-state`: the split-brain probe of VM `uuid` on its primary.
    pub async fn primary_vm_state(&self, uuid: Uuid) -> Result<PrimaryVmState, TransportError> {
        match self.call(PeerRequest::PrimaryVmState { uuid }).await? {
            PeerResponse::PrimaryVmState(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// `source-vm-state`: the split-brain probe of VM `uuid` on its source across an extended
    /// chain (the source answers for its own primary). `Ok(None)` when this connection speaks
    /// a protocol older than [`vmr_proto::wire::SOURCE_VM_STATE_SINCE`]: the call is not sent
    /// (use [`Client::primary_vm_state`]).
    pub async fn source_vm_state(
        &self,
        uuid: Uuid,
    ) -> Result<Option<SourceVmState>, TransportError> {
        if self.hello.protocol < vmr_proto::wire::SOURCE_VM_STATE_SINCE {
            return Ok(None);
        }
        match self.call(PeerRequest::SourceVmState { uuid }).await? {
            PeerResponse::SourceVmState(s) => Ok(Some(s)),
            other => Err(unexpected(&other)),
        }
    }

    /// `continue-from`: tells the extended replica that the VM failed over here from `point`
    /// and replicates to it from there; its answer says what the next cycle builds on. Refused
    /// with a protocol error on a connection older than
    /// [`vmr_proto::wire::SOURCE_VM_STATE_SINCE`] (the peer does not know the call).
    pub async fn continue_from(
        &self,
        uuid: Uuid,
        point: u64,
    ) -> Result<ContinuedFrom, TransportError> {
        if self.hello.protocol < vmr_proto::wire::SOURCE_VM_STATE_SINCE {
            return Err(TransportError::PeerTooOld {
                what: "the continue-from call",
                peer: self.hello.protocol,
                needs: vmr_proto::wire::SOURCE_VM_STATE_SINCE,
            });
        }
        let req = PeerRequest::ContinueFrom(ContinueFromRequest { uuid, point });
        match self.call(req).await? {
            PeerResponse::ContinueFrom(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// `follow`: tells a sibling replica of a fanned-out VM (fan-out's failover) that the VM
    /// failed over here and replicates to it from now on; its answer is the point it keeps as
    /// the base of a resynchronisation. Refused with a protocol error on a connection older
    /// than [`vmr_proto::wire::FOLLOW_SINCE`] (the peer does not know the call).
    pub async fn follow(&self, uuid: Uuid) -> Result<ContinuedFrom, TransportError> {
        if self.hello.protocol < vmr_proto::wire::FOLLOW_SINCE {
            return Err(TransportError::PeerTooOld {
                what: "the follow call",
                peer: self.hello.protocol,
                needs: vmr_proto::wire::FOLLOW_SINCE,
            });
        }
        match self.call(PeerRequest::Follow { uuid }).await? {
            PeerResponse::Follow(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// `witness`: one lease call to the witness agent of a VM relationship
    /// (`docs/auto-failover.md`). Refused with a protocol error on a connection older than
    /// [`vmr_proto::wire::WITNESS_SINCE`] (the peer does not know the call).
    pub async fn witness(&self, call: WitnessRequest) -> Result<WitnessResponse, TransportError> {
        if self.hello.protocol < vmr_proto::wire::WITNESS_SINCE {
            return Err(TransportError::PeerTooOld {
                what: "the witness call",
                peer: self.hello.protocol,
                needs: vmr_proto::wire::WITNESS_SINCE,
            });
        }
        match self.call(PeerRequest::Witness { call }).await? {
            PeerResponse::Witness { lease } => Ok(lease),
            other => Err(unexpected(&other)),
        }
    }

    /// `promise`: asks the replica of VM `uuid` not to ask the witness for its lease for a
    /// lease's length (automatic failover, `docs/auto-failover.md`). Refused with a protocol
    /// error on a connection older than [`vmr_proto::wire::WITNESS_SINCE`].
    pub async fn promise(&self, uuid: Uuid) -> Result<PromiseResponse, TransportError> {
        if self.hello.protocol < vmr_proto::wire::WITNESS_SINCE {
            return Err(TransportError::PeerTooOld {
                what: "the promise call",
                peer: self.hello.protocol,
                needs: vmr_proto::wire::WITNESS_SINCE,
            });
        }
        match self.call(PeerRequest::Promise { uuid }).await? {
            PeerResponse::Promise(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// `become-replica`: asks the old primary to become the replica.
    pub async fn become_replica(
        &self,
        req: BecomeReplica,
    ) -> Result<BecameReplica, TransportError> {
        match self.call(PeerRequest::BecomeReplica(req)).await? {
            PeerResponse::BecomeReplica(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    /// `resync-hashes`: the replica's block hashes; their number is checked against `req.count`.
    pub async fn resync_hashes(
        &self,
        req: BlockHashesRequest,
    ) -> Result<BlockHashes, TransportError> {
        let count = req.count;
        match self.call(PeerRequest::ResyncHashes(req)).await? {
            PeerResponse::ResyncHashes(h) if h.hashes.len() as u64 == count => Ok(h),
            PeerResponse::ResyncHashes(h) => {
                Err(TransportError::Protocol(ProtocolFault::HashCount {
                    got: h.hashes.len(),
                    want: count,
                }))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// `disable-replica`: tells the replica that replication of VM `uuid` was disabled here;
    /// the replica VM's state afterwards. `Ok(None)` when this connection speaks a protocol
    /// older than [`vmr_proto::wire::DISABLE_REPLICA_SINCE`]: the peer does not know the call,
    /// and it is not sent.
    pub async fn disable_replica(
        &self,
        uuid: Uuid,
    ) -> Result<Option<ReplicationState>, TransportError> {
        if self.hello.protocol < vmr_proto::wire::DISABLE_REPLICA_SINCE {
            return Ok(None);
        }
        match self.call(PeerRequest::DisableReplica { uuid }).await? {
            PeerResponse::DisableReplica { state } => Ok(Some(state)),
            other => Err(unexpected(&other)),
        }
    }
}

/// [`Client::call`] already checks the answer's variant; this is the typed helpers' fallback.
fn unexpected(answer: &PeerResponse) -> TransportError {
    TransportError::Protocol(ProtocolFault::UnexpectedAnswer(answer.method()))
}

fn empty_body() -> ReqBody {
    full_body(Bytes::new())
}

/// Reads a JSON response: `T` on success, the typed [`RemoteError`] otherwise.
async fn read_json<T: serde::de::DeserializeOwned>(
    resp: Response<Incoming>,
) -> Result<T, TransportError> {
    let body = read_body(resp).await?;
    serde_json::from_slice(&body)
        .map_err(|e| TransportError::Protocol(ProtocolFault::ResponseJson(e)))
}

/// Reads a response body: the bytes on success, the typed [`RemoteError`] otherwise.
async fn read_body(resp: Response<Incoming>) -> Result<Bytes, TransportError> {
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|cause| {
            if cause.is::<http_body_util::LengthLimitError>() {
                TransportError::Protocol(ProtocolFault::ResponseTooLarge(MAX_JSON_BODY))
            } else {
                TransportError::Interrupted {
                    during: "response body",
                    cause,
                }
            }
        })?
        .to_bytes();
    if status.is_success() {
        Ok(body)
    } else {
        match serde_json::from_slice::<RemoteError>(&body) {
            Ok(e) => Err(TransportError::Remote(e)),
            Err(_) => Err(TransportError::Protocol(ProtocolFault::UntypedHttpError {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            })),
        }
    }
}
