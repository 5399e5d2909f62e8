//! The monitoring listener: plain HTTP/1.1 on its own address (`metrics-listen`, off unless
//! set), read-only, serving `/metrics` (every VM's gauges and telemetry in the OpenMetrics
//! text format). A non-loopback listener requires a bearer token (`config::metrics_config`
//! refuses one without); when a token is set, every route checks it: `Authorization: Bearer
//! TOKEN`, or HTTP Basic with the token as the password (what a browser sends for the
//! dashboard; the 401 answer offers Basic first so that the browser asks).
//!
//! More routes (a dashboard's pages and files) come from other modules: [`start`] takes their
//! [`MonitorRouter`] and serves it beside [`routes`], behind the same token check, with the same
//! [`Monitor`] state, whose [`Monitor::gather`] answers what every VM's owner says now.
//!
//! A scrape asks every owner for its status through the registry, all at once, each with a
//! deadline ([`STATUS_DEADLINE`]): a busy owner still answers (a cycle streams, and a
//! replica's prune merges, in a task of its own), and a stuck one is reported
//! `vmreplica_up 0` instead of holding the scrape.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry as PromRegistry, Unit};
use uuid::Uuid;
use vmr_proto::api::{Health, ReplicationMode, VmStatus};

use crate::config::MetricsConfig;
use crate::errors::AgentError;
use crate::host::Host;
use crate::telemetry::VmCounters;
use crate::util::now_ms;
use crate::vm::{Command, Registry};

/// How long a scrape waits for one VM's owner to answer its status.
pub const STATUS_DEADLINE: Duration = Duration::from_secs(2);

/// The content type of `/metrics` (OpenMetrics text 1.0.0, which Prometheus negotiates and
/// parses; it ends with `# EOF`).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the monitoring routes serve from.
pub struct Monitor {
    /// Host resources (config, telemetry, stores).
    pub host: Arc<Host>,
    /// Every VM's owner.
    pub vms: Arc<Registry>,
    /// The bearer token requests must carry.
    token: Option<String>,
    /// Each VM's role and peer as its owner last said them, for the series of a VM whose owner
    /// did not answer in time.
    known: Mutex<BTreeMap<Uuid, (&'static str, String)>>,
}

/// The routes of the monitoring listener, on the [`Monitor`] state.
pub type MonitorRouter = Router<Arc<Monitor>>;

/// One VM as a scrape saw it.
#[derive(Debug, Clone)]
pub struct VmView {
    /// VM name.
    pub name: String,
    /// VM UUID.
    pub uuid: Uuid,
    /// `primary` or `replica` (empty when never known).
    pub role: &'static str,
    /// The other side: the replica's address on a primary, the primary's name on a replica.
    pub peer: String,
    /// Its status, when its owner answered within the deadline.
    pub status: Option<VmStatus>,
    /// Its telemetry since the agent started.
    pub counters: Option<VmCounters>,
    /// Replica VMs: free bytes of the file system holding its store.
    pub store_free_bytes: Option<u64>,
}

impl Monitor {
    /// The monitoring state.
    pub fn new(host: Arc<Host>, vms: Arc<Registry>, token: Option<String>) -> Monitor {
        Monitor {
            host,
            vms,
            token,
            known: Mutex::new(BTreeMap::new()),
        }
    }

    /// Every VM now: its owner's status (asked of all owners at once, each with
    /// [`STATUS_DEADLINE`]), telemetry and store space.
    pub async fn gather(&self) -> Vec<VmView> {
        let handles = self.vms.all();
        let answers = futures::future::join_all(handles.iter().map(|h| async move {
            tokio::time::timeout(STATUS_DEADLINE, h.ask(Command::Status))
                .await
                .ok()
                .and_then(Result::ok)
        }))
        .await;
        let mut free: BTreeMap<PathBuf, Option<u64>> = BTreeMap::new();
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the VMs removed since.
        known.retain(|u, _| handles.iter().any(|h| h.uuid == *u));
        let mut out = Vec::with_capacity(handles.len());
        for (h, status) in handles.into_iter().zip(answers) {
            if let Some(st) = &status {
                let (role, peer) = match st.mode {
                    ReplicationMode::Primary => ("primary", st.replica.clone()),
                    ReplicationMode::Replica => ("replica", st.primary.clone()),
                };
                known.insert(h.uuid, (role, peer));
            }
            let (role, peer) = known.get(&h.uuid).cloned().unwrap_or(("", String::new()));
            let store_free_bytes = status
                .as_ref()
                .filter(|s| s.mode == ReplicationMode::Replica)
                .and_then(|s| {
                    let root = self.host.storage_of(&s.primary);
                    *free
                        .entry(root.clone())
                        .or_insert_with(|| free_bytes(&root))
                });
            out.push(VmView {
                counters: self.host.telemetry.counters(h.uuid),
                name: h.name,
                uuid: h.uuid,
                role,
                peer,
                status,
                store_free_bytes,
            });
        }
        out
    }
}

/// Free bytes (for unprivileged users) of the file system holding `path`.
// The statvfs fields are u64 on 64-bit Linux but narrower elsewhere.
#[allow(clippy::useless_conversion)]
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())))
}

/// The monitoring listener's own routes: `/metrics`.
pub fn routes() -> MonitorRouter {
    Router::new().route("/metrics", get(metrics))
}

/// Bind the monitoring listener and serve `routes()` and `extra` in the background until the
/// agent shuts down; returns the bound address.
pub async fn start(
    monitor: Arc<Monitor>,
    cfg: &MetricsConfig,
    extra: MonitorRouter,
) -> Result<SocketAddr, AgentError> {
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|err| AgentError::BindMetrics {
            addr: cfg.addr,
            err,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|err| AgentError::BindMetrics {
            addr: cfg.addr,
            err,
        })?;
    let shutdown = monitor.host.shutdown.clone();
    let app = routes()
        .merge(extra)
        .layer(axum::middleware::from_fn_with_state(monitor.clone(), auth))
        .with_state(monitor);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!("the monitoring listener stopped: {e}");
        }
    });
    Ok(addr)
}

/// Whether `given` is `token`, in time that does not depend on where they differ.
fn same_token(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len() && given.iter().zip(token).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// The token a request carries: `Authorization: Bearer TOKEN` (Prometheus, scripts) or HTTP
/// Basic with the token as the password and any user name (a browser, which asks for it).
fn given_token(req: &Request) -> Option<String> {
    use base64::Engine as _;
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = v.strip_prefix("Bearer ") {
        return Some(t.trim().to_owned());
    }
    let b64 = v.strip_prefix("Basic ")?;
    let pair = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let pair = String::from_utf8(pair).ok()?;
    pair.split_once(':').map(|(_, pw)| pw.to_owned())
}

/// The token check in front of every route (nothing to check without a token).
async fn auth(State(m): State<Arc<Monitor>>, req: Request, next: Next) -> Response {
    if let Some(token) = &m.token {
        let given = given_token(&req);
        if !given.is_some_and(|g| same_token(g.as_bytes(), token.as_bytes())) {
            // Basic first: a browser asks for it (user name anything, password the token).
            // Both challenges are sent (appended: a header array would keep only the last).
            let mut resp = (
                StatusCode::UNAUTHORIZED,
                "a token is required (Authorization: Bearer TOKEN, or HTTP Basic with the token \
                 as the password; the agent's metrics-token-file)\n",
            )
                .into_response();
            for challenge in [
                "Basic realm=\"vmreplica\", charset=\"UTF-8\"",
                "Bearer realm=\"vmreplica\"",
            ] {
                resp.headers_mut().append(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static(challenge),
                );
            }
            return resp;
        }
    }
    next.run(req).await
}

async fn metrics(State(m): State<Arc<Monitor>>) -> Response {
    let rows = m.gather().await;
    match encode(rows, m.host.events.dropped(), now_ms()) {
        Ok(text) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// The `/metrics` text of `rows` at `now_ms`, with the events each event sink dropped
/// (`(sink, count)`: its queue was full).
pub fn encode(
    rows: Vec<VmView>,
    dropped: Vec<(String, u64)>,
    now_ms: u64,
) -> Result<String, std::fmt::Error> {
    let mut reg = PromRegistry::default();
    reg.register_collector(Box::new(Scrape {
        rows,
        dropped,
        now_ms,
    }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

/// One scrape's data, encoded by prometheus-client.
#[derive(Debug)]
struct Scrape {
    rows: Vec<VmView>,
    dropped: Vec<(String, u64)>,
    now_ms: u64,
}

type Labels = Vec<(&'static str, String)>;

/// A label value escaped as the text format wants it (`\\`, `\"`, `\n`): prometheus-client
/// 0.23 writes label values as they are, and a VM name may hold a quote or a backslash.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn labels(v: &VmView) -> Labels {
    vec![
        ("vm", esc(&v.name)),
        ("uuid", v.uuid.to_string()),
        ("role", v.role.to_owned()),
        ("peer", esc(&v.peer)),
    ]
}

/// The numeric health: 0 Normal, 1 Warning, 2 Critical.
pub fn health_value(h: Health) -> i64 {
    match h {
        Health::Normal => 0,
        Health::Warning => 1,
        Health::Critical => 2,
    }
}

fn ms_to_secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl Scrape {
    /// One gauge family: a sample per row that has a value.
    fn gauge<T: EncodeGaugeValue>(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&VmView) -> Option<T>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for r in &self.rows {
            if let Some(v) = value(r) {
                let l = labels(r);
                m.encode_family(&l)?.encode_gauge(&v)?;
            }
        }
        Ok(())
    }

    /// One gauge family of replica VMs' extended (outgoing) relationships: labelled
    /// `relationship="extended"`, the peer being the extended replica.
    fn extended_gauge<T: EncodeGaugeValue>(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&vmr_proto::api::ExtendedStatus) -> Option<T>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for r in &self.rows {
            if let Some(x) = r.status.as_ref().and_then(|s| s.extended.as_ref())
                && let Some(v) = value(x)
            {
                m.encode_family(&extended_labels(r, x))?.encode_gauge(&v)?;
            }
        }
        Ok(())
    }
}

impl Scrape {
    /// One gauge family of primary VMs' further relationships (fan-out): labelled
    /// `relationship="fanout-N"` (N from 2: the VM's own series are relationship 1), the peer
    /// being that relationship's replica.
    fn fanout_gauge<T: EncodeGaugeValue>(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&VmStatus) -> Option<T>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for r in &self.rows {
            for (i, f) in r.status.iter().flat_map(|s| s.fanout.iter()).enumerate() {
                if let Some(v) = value(f) {
                    m.encode_family(&fanout_labels(r, i, f))?.encode_gauge(&v)?;
                }
            }
        }
        Ok(())
    }
}

/// The labels of fan-out relationship `i + 2` of a primary VM.
fn fanout_labels(r: &VmView, i: usize, f: &VmStatus) -> Labels {
    vec![
        ("vm", esc(&r.name)),
        ("uuid", r.uuid.to_string()),
        ("role", r.role.to_owned()),
        ("peer", esc(&f.replica)),
        ("relationship", format!("fanout-{}", i + 2)),
    ]
}

fn extended_labels(r: &VmView, x: &vmr_proto::api::ExtendedStatus) -> Labels {
    vec![
        ("vm", esc(&r.name)),
        ("uuid", r.uuid.to_string()),
        ("role", r.role.to_owned()),
        ("peer", esc(&x.replica)),
        ("relationship", "extended".to_owned()),
    ]
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let secs = Unit::Seconds;
        let bytes = Unit::Bytes;
        let now = self.now_ms;
        {
            let version: Labels = vec![("version", env!("CARGO_PKG_VERSION").to_owned())];
            let mut m = enc.encode_descriptor(
                "vmreplica",
                "The vmreplica agent serving these metrics",
                None,
                MetricType::Info,
            )?;
            m.encode_info(&version)?;
        }
        {
            let mut m = enc.encode_descriptor(
                "vmreplica_events_dropped",
                "Events an event sink (webhook or command) dropped since the agent started \
                 because its queue was full",
                None,
                MetricType::Counter,
            )?;
            // Labelled by kind and place in the config (`webhook 1`, `command 2`), not by the
            // URL or command line, which may carry a secret.
            for (i, (sink, n)) in self.dropped.iter().enumerate() {
                let kind = sink.split(' ').next().unwrap_or("sink");
                let l: Labels = vec![("sink", esc(&format!("{kind} {}", i + 1)))];
                m.encode_family(&l)?
                    .encode_counter::<Labels, _, f64>(n, None)?;
            }
        }
        self.gauge(
            &mut enc,
            "vmreplica_up",
            "1 when the VM's owner answered this scrape within its deadline, else 0",
            None,
            |r| Some(i64::from(r.status.is_some())),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "vmreplica_state",
                "The VM's replication state (one series per VM with value 1)",
                None,
                MetricType::Info,
            )?;
            for r in &self.rows {
                if let Some(st) = &r.status {
                    let mut l = labels(r);
                    l.push(("state", st.state.to_string()));
                    m.encode_info(&l)?;
                }
            }
        }
        self.gauge(
            &mut enc,
            "vmreplica_health",
            "Replication health: 0 Normal, 1 Warning, 2 Critical",
            None,
            |r| r.status.as_ref().map(|s| health_value(s.health)),
        )?;
        self.gauge(
            &mut enc,
            "vmreplica_last_point_timestamp",
            "Cut time of the latest point the replica holds (Unix time)",
            Some(&secs),
            |r| {
                r.status
                    .as_ref()
                    .and_then(|s| s.last_point_ms)
                    .map(ms_to_secs)
            },
        )?;
        self.gauge(
            &mut enc,
            "vmreplica_replication_lag",
            "Now minus the cut time of the latest point the replica holds: the RPO achieved",
            Some(&secs),
            |r| {
                r.status
                    .as_ref()
                    .and_then(|s| s.last_point_ms)
                    .map(|t| ms_to_secs(now.saturating_sub(t)))
            },
        )?;
        self.gauge(
            &mut enc,
            "vmreplica_frequency",
            "The VM's replication interval",
            Some(&secs),
            |r| {
                r.status
                    .as_ref()
                    .filter(|s| s.frequency_secs > 0)
                    .map(|s| s.frequency_secs as i64)
            },
        )?;
        self.gauge(
            &mut enc,
            "vmreplica_continuous",
            "1 when the VM replicates continuously (--frequency continuous: no interval; its \
             RPO is vmreplica_replication_lag), 0 when it has an interval",
            None,
            |r| {
                r.status
                    .as_ref()
                    .filter(|s| s.frequency_secs > 0 || s.continuous)
                    .map(|s| i64::from(s.continuous))
            },
        )?;
        self.gauge(
            &mut enc,
            "vmreplica_pending",
            "Primary VMs: changed bytes tracked but not yet shipped, as last measured",
            Some(&bytes),
            |r| {
                r.status
                    .as_ref()
                    .filter(|s| s.mode == ReplicationMode::Primary)
                    .map(|s| s.stats.pending_bytes as i64)
            },
        )?;
        self.gauge(
            &mut enc,
            "vmreplica_recovery_points",
            "Replica VMs: committed recovery points",
            None,
            |r| {
                r.status
                    .as_ref()
                    .and_then(|s| s.recovery_points)
                    .map(|n| n as i64)
            },
        )?;
        {
            let mut m = enc.encode_descriptor(
                "vmreplica_extended_state",
                "Replica VMs forwarding their points to a third host: the extended \
                 relationship's state (one series per VM with value 1)",
                None,
                MetricType::Info,
            )?;
            for r in &self.rows {
                if let Some(x) = r.status.as_ref().and_then(|s| s.extended.as_ref()) {
                    let mut l = extended_labels(r, x);
                    l.push(("state", x.state.to_string()));
                    m.encode_info(&l)?;
                }
            }
        }
        self.extended_gauge(
            &mut enc,
            "vmreplica_extended_health",
            "The extended relationship's health: 0 Normal, 1 Warning, 2 Critical",
            None,
            |x| Some(health_value(x.health)),
        )?;
        self.extended_gauge(
            &mut enc,
            "vmreplica_extended_replication_lag",
            "Now minus the cut time of the latest point the extended replica acknowledged",
            Some(&secs),
            |x| x.last_point_ms.map(|t| ms_to_secs(now.saturating_sub(t))),
        )?;
        self.extended_gauge(
            &mut enc,
            "vmreplica_extended_last_point",
            "The id of the latest point the extended replica acknowledged",
            None,
            |x| x.last_point_sent.map(|p| p as i64),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "vmreplica_fanout_state",
                "Primary VMs replicating to several replicas: each further relationship's \
                 state (one series per relationship with value 1)",
                None,
                MetricType::Info,
            )?;
            for r in &self.rows {
                for (i, f) in r.status.iter().flat_map(|s| s.fanout.iter()).enumerate() {
                    let mut l = fanout_labels(r, i, f);
                    l.push(("state", f.state.to_string()));
                    m.encode_info(&l)?;
                }
            }
        }
        self.fanout_gauge(
            &mut enc,
            "vmreplica_fanout_health",
            "A further relationship's health: 0 Normal, 1 Warning, 2 Critical",
            None,
            |f| Some(health_value(f.health)),
        )?;
        self.fanout_gauge(
            &mut enc,
            "vmreplica_fanout_replication_lag",
            "A further relationship's lag: now minus the cut time of its latest acknowledged \
             cycle",
            Some(&secs),
            |f| f.lag_ms.map(ms_to_secs),
        )?;
        self.fanout_gauge(
            &mut enc,
            "vmreplica_fanout_last_cycle",
            "The id of a further relationship's latest acknowledged cycle",
            None,
            |f| f.last_cycle.map(|p| p as i64),
        )?;
        self.gauge(
            &mut enc,
            "vmreplica_replica_store_free",
            "Replica VMs: free space of the file system holding the VM's replica store",
            Some(&bytes),
            |r| r.store_free_bytes.map(|n| n as i64),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "vmreplica_cycles",
                "Cycles that ended since the agent started, by result (missed: an interval \
                 passed without a cycle completing in it)",
                None,
                MetricType::Counter,
            )?;
            for r in &self.rows {
                let Some(c) = &r.counters else { continue };
                for (result, n) in [
                    ("success", c.success),
                    ("failed", c.failed),
                    ("missed", c.missed),
                ] {
                    let mut l = labels(r);
                    l.push(("result", result.to_owned()));
                    m.encode_family(&l)?
                        .encode_counter::<Labels, _, f64>(&n, None)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "vmreplica_shipped",
                "Bytes of successful cycles (shipped by a primary, applied by a replica) since \
                 the agent started",
                Some(&bytes),
                MetricType::Counter,
            )?;
            for r in &self.rows {
                if let Some(c) = &r.counters {
                    let l = labels(r);
                    m.encode_family(&l)?
                        .encode_counter::<Labels, _, f64>(&c.shipped_bytes, None)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "vmreplica_cycle_duration",
                "Duration of successful cycles since the agent started",
                Some(&secs),
                MetricType::Histogram,
            )?;
            for r in &self.rows {
                if let Some(c) = &r.counters {
                    let l = labels(r);
                    m.encode_family(&l)?.encode_histogram::<Labels>(
                        c.duration_sum_secs,
                        c.success,
                        &c.buckets(),
                        None,
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(mode: ReplicationMode, health: Health, last_point_ms: Option<u64>) -> VmStatus {
        let mut s: VmStatus = serde_json::from_value(serde_json::json!({
            "name": "web1", "uuid": Uuid::from_u128(1), "state": "Replicating",
            "health": health, "health_reason": "", "mode": mode, "frequency_secs": 30,
            "primary": "host-a", "replica": "10.0.0.2:9443", "last_replication_ms": null,
            "last_cycle": null, "stats": vmr_proto::api::ReplicationStats::default(),
            "progress": null
        }))
        .expect("a status");
        s.last_point_ms = last_point_ms;
        s.stats.pending_bytes = 3 << 20;
        s
    }

    #[test]
    fn the_text_has_every_series_with_its_labels() {
        let mut counters = VmCounters {
            success: 2,
            failed: 1,
            missed: 3,
            shipped_bytes: 5000,
            duration_sum_secs: 3.5,
            ..Default::default()
        };
        counters.duration_buckets[0] = 1;
        counters.duration_buckets[3] = 1;
        let rows = vec![
            VmView {
                name: "web1".into(),
                uuid: Uuid::from_u128(1),
                role: "primary",
                peer: "10.0.0.2:9443".into(),
                status: Some(status(
                    ReplicationMode::Primary,
                    Health::Warning,
                    Some(88_000),
                )),
                counters: Some(counters),
                store_free_bytes: None,
            },
            VmView {
                name: "db \"1\"".into(),
                uuid: Uuid::from_u128(2),
                role: "replica",
                peer: "host-a".into(),
                status: None,
                counters: None,
                store_free_bytes: None,
            },
        ];
        let text = encode(
            rows,
            vec![("webhook https://u:secret@example.net/x".into(), 4)],
            100_000,
        )
        .expect("encode");
        let l = "vm=\"web1\",uuid=\"00000000-0000-0000-0000-000000000001\",role=\"primary\",peer=\"10.0.0.2:9443\"";
        for line in [
            format!("vmreplica_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
            "vmreplica_events_dropped_total{sink=\"webhook 1\"} 4".to_owned(),
            format!("vmreplica_up{{{l}}} 1"),
            "vmreplica_up{vm=\"db \\\"1\\\"\",uuid=\"00000000-0000-0000-0000-000000000002\",role=\"replica\",peer=\"host-a\"} 0".to_owned(),
            format!("vmreplica_state_info{{{l},state=\"Replicating\"}} 1"),
            format!("vmreplica_health{{{l}}} 1"),
            format!("vmreplica_last_point_timestamp_seconds{{{l}}} 88.0"),
            format!("vmreplica_replication_lag_seconds{{{l}}} 12.0"),
            format!("vmreplica_pending_bytes{{{l}}} 3145728"),
            format!("vmreplica_frequency_seconds{{{l}}} 30"),
            format!("vmreplica_continuous{{{l}}} 0"),
            format!("vmreplica_cycles_total{{{l},result=\"success\"}} 2"),
            format!("vmreplica_cycles_total{{{l},result=\"failed\"}} 1"),
            format!("vmreplica_cycles_total{{{l},result=\"missed\"}} 3"),
            format!("vmreplica_shipped_bytes_total{{{l}}} 5000"),
            format!("vmreplica_cycle_duration_seconds_bucket{{le=\"0.5\",{l}}} 1"),
            format!("vmreplica_cycle_duration_seconds_bucket{{le=\"2.5\",{l}}} 1"),
            format!("vmreplica_cycle_duration_seconds_bucket{{le=\"5.0\",{l}}} 2"),
            format!("vmreplica_cycle_duration_seconds_bucket{{le=\"+Inf\",{l}}} 2"),
            format!("vmreplica_cycle_duration_seconds_sum{{{l}}} 3.5"),
            format!("vmreplica_cycle_duration_seconds_count{{{l}}} 2"),
            "# TYPE vmreplica_cycle_duration_seconds histogram".to_owned(),
            "# UNIT vmreplica_replication_lag_seconds seconds".to_owned(),
        ] {
            assert!(text.lines().any(|x| x == line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // A VM whose owner did not answer has no gauges beyond `up`.
        assert!(!text.contains("vmreplica_health{vm=\"db"), "{text}");
    }

    /// A primary VM replicating to two replicas: the further relationship has its own series,
    /// labelled `relationship="fanout-2"` with its replica as the peer.
    #[test]
    fn a_fanned_out_vm_has_series_per_relationship() {
        let mut st = status(ReplicationMode::Primary, Health::Normal, Some(97_000));
        let mut c = status(ReplicationMode::Primary, Health::Warning, Some(40_000));
        c.replica = "10.0.0.3:9443".into();
        c.state = vmr_proto::api::ReplicationState::Suspended;
        c.last_cycle = Some(7);
        c.lag_ms = Some(60_000);
        st.fanout = vec![c];
        let rows = vec![VmView {
            name: "web1".into(),
            uuid: Uuid::from_u128(1),
            role: "primary",
            peer: "10.0.0.2:9443".into(),
            status: Some(st),
            counters: None,
            store_free_bytes: None,
        }];
        let text = encode(rows, vec![], 100_000).expect("encode");
        let l = "vm=\"web1\",uuid=\"00000000-0000-0000-0000-000000000001\",role=\"primary\",peer=\"10.0.0.3:9443\",relationship=\"fanout-2\"";
        for line in [
            format!("vmreplica_fanout_state_info{{{l},state=\"Suspended\"}} 1"),
            format!("vmreplica_fanout_health{{{l}}} 1"),
            format!("vmreplica_fanout_replication_lag_seconds{{{l}}} 60.0"),
            format!("vmreplica_fanout_last_cycle{{{l}}} 7"),
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    /// A continuous VM has no interval: `vmreplica_continuous` 1 and no frequency series; its
    /// RPO is the lag series.
    #[test]
    fn a_continuous_vm_has_no_frequency_series() {
        let mut st = status(ReplicationMode::Primary, Health::Normal, Some(97_000));
        st.frequency_secs = 0;
        st.continuous = true;
        let rows = vec![VmView {
            name: "cdp".into(),
            uuid: Uuid::from_u128(1),
            role: "primary",
            peer: "10.0.0.2:9443".into(),
            status: Some(st),
            counters: None,
            store_free_bytes: None,
        }];
        let text = encode(rows, vec![], 100_000).expect("encode");
        let l = "vm=\"cdp\",uuid=\"00000000-0000-0000-0000-000000000001\",role=\"primary\",peer=\"10.0.0.2:9443\"";
        for line in [
            format!("vmreplica_continuous{{{l}}} 1"),
            format!("vmreplica_replication_lag_seconds{{{l}}} 3.0"),
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("vmreplica_frequency_seconds{"), "{text}");
    }

    #[test]
    fn an_extended_relationship_has_its_own_series_named_extended() {
        let mut st = status(ReplicationMode::Replica, Health::Normal, Some(90_000));
        st.extended = Some(vmr_proto::api::ExtendedStatus {
            relationship: "extended".into(),
            state: vmr_proto::api::ReplicationState::Replicating,
            health: Health::Critical,
            health_reason: "cannot replicate".into(),
            replica: "10.0.0.3:9443".into(),
            frequency_secs: 300,
            last_point_sent: Some(41),
            last_point_ms: Some(70_000),
            lag_ms: Some(30_000),
            last_replication_ms: Some(80_000),
            running_point: None,
            running_bytes: None,
            stats: vmr_proto::api::ReplicationStats::default(),
        });
        let rows = vec![VmView {
            name: "web1".into(),
            uuid: Uuid::from_u128(1),
            role: "replica",
            peer: "host-a".into(),
            status: Some(st),
            counters: None,
            store_free_bytes: None,
        }];
        let text = encode(rows, vec![], 100_000).expect("encode");
        let l = "vm=\"web1\",uuid=\"00000000-0000-0000-0000-000000000001\",role=\"replica\",peer=\"10.0.0.3:9443\",relationship=\"extended\"";
        for line in [
            format!("vmreplica_extended_state_info{{{l},state=\"Replicating\"}} 1"),
            format!("vmreplica_extended_health{{{l}}} 2"),
            format!("vmreplica_extended_replication_lag_seconds{{{l}}} 30.0"),
            format!("vmreplica_extended_last_point{{{l}}} 41"),
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing {line:?} in\n{text}"
            );
        }
        // The incoming relationship's series stay as they were.
        assert!(text.contains("vmreplica_health{vm=\"web1\",uuid=\"00000000-0000-0000-0000-000000000001\",role=\"replica\",peer=\"host-a\"} 0"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(esc("web1"), "web1");
    }

    #[test]
    fn the_token_comes_as_bearer_or_as_the_basic_password() {
        use base64::Engine as _;
        let req = |v: &str| {
            Request::builder()
                .header(header::AUTHORIZATION, v)
                .body(axum::body::Body::empty())
                .expect("request")
        };
        assert_eq!(given_token(&req("Bearer abc ")), Some("abc".into()));
        let b = base64::engine::general_purpose::STANDARD.encode("admin:s3c:ret");
        assert_eq!(
            given_token(&req(&format!("Basic {b}"))),
            Some("s3c:ret".into())
        );
        assert_eq!(given_token(&req("Basic !!")), None);
        assert_eq!(given_token(&req("Digest x")), None);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abd", b"abc"));
        assert!(!same_token(b"ab", b"abc"));
        assert!(!same_token(b"", b"abc"));
    }
}
