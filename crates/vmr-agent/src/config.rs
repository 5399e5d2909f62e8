//! An agent directory: its config file, creating it with a TLS identity (`vmreplica init`),
//! the control socket's path, and what the config says about reaching this agent (the address
//! reported to replicas, the local address of outgoing connections).

use std::path::{Path, PathBuf};

use vmr_proto::api::AgentConfig;

use crate::errors::AgentError;

/// Name of the config file in the agent directory.
pub const CONFIG_FILE: &str = "config.toml";

/// Load `DIR/config.toml`.
pub fn load_config(dir: &Path) -> Result<AgentConfig, AgentError> {
    let path = dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(err) => {
            return Err(AgentError::ConfigUnreadable {
                path,
                dir: dir.to_path_buf(),
                err,
            });
        }
    };
    let cfg: AgentConfig = toml::from_str(&text).map_err(|source| AgentError::ConfigInvalid {
        path: path.clone(),
        source,
    })?;
    if cfg.max_concurrent_cycles == 0 {
        return Err(AgentError::ConfigValue {
            path,
            key: "max-concurrent-cycles",
            reason: "must be at least 1",
        });
    }
    Ok(cfg)
}

/// Refuse a TLS key that group or others can read (or write): whoever reads it can act as
/// this agent towards every peer that trusts it.
pub fn check_key_mode(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(vmr_transport::KEY_FILE);
    let mode = std::fs::metadata(&path)
        .map_err(AgentError::io("reading the mode of", &path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(AgentError::KeyExposed { path, mode });
    }
    Ok(())
}

/// A VM name as `vm add` accepts it: 1 to [`MAX_VM_NAME`] characters, none of them a control
/// character (a newline would break the status table and the logs) or `/`.
pub fn validate_vm_name(name: &str) -> Result<(), AgentError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.chars().count() > MAX_VM_NAME {
        "it is longer than 64 characters"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else if name.contains('/') {
        "it contains '/'"
    } else if name.trim() != name {
        "it starts or ends with white space"
    } else {
        return Ok(());
    };
    let shown: String = name.chars().take(MAX_VM_NAME).collect();
    Err(AgentError::BadVmName {
        name: shown,
        reason,
    })
}

/// Longest VM name (characters).
pub const MAX_VM_NAME: usize = 64;

/// `init --metrics ADDR [--metrics-token]`: the monitoring listener of a new agent.
#[derive(Debug, Clone, Copy)]
pub struct MetricsInit<'a> {
    /// HOST:PORT (a host name is resolved).
    pub listen: &'a str,
    /// Create a bearer token ([`METRICS_TOKEN_FILE`]) that every monitoring request must carry.
    pub token: bool,
}

/// The token file `init --metrics-token` creates in the agent directory.
pub const METRICS_TOKEN_FILE: &str = "metrics.token";

/// The monitoring listener as the agent runs it (`metrics-listen`, `metrics-token-file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// The address to bind.
    pub addr: std::net::SocketAddr,
    /// The bearer token requests must carry, when one is set.
    pub token: Option<String>,
}

/// The monitoring listener of `cfg` (none when `metrics-listen` is not set): a non-loopback
/// address without a token is refused, and so is a token file that is empty or that group or
/// others can read.
pub fn metrics_config(dir: &Path, cfg: &AgentConfig) -> Result<Option<MetricsConfig>, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let Some(listen) = &cfg.metrics_listen else {
        return Ok(None);
    };
    let addr = resolve_addr("metrics-listen", listen)?;
    let token = match &cfg.metrics_token_file {
        None => None,
        Some(file) => {
            let path = dir.join(file);
            let meta =
                std::fs::metadata(&path).map_err(AgentError::io("reading the mode of", &path))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(AgentError::MetricsToken {
                    path,
                    reason: "group or others can read it (chmod 600 it)",
                });
            }
            let text = std::fs::read_to_string(&path).map_err(AgentError::io("reading", &path))?;
            let token = text.trim();
            if token.is_empty() || token.contains(char::is_whitespace) {
                return Err(AgentError::MetricsToken {
                    path,
                    reason: "it must hold one token (no white space inside)",
                });
            }
            Some(token.to_owned())
        }
    };
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(AgentError::MetricsNeedsToken { listen: addr });
    }
    Ok(Some(MetricsConfig { addr, token }))
}

/// A new random bearer token: 32 bytes from the kernel's generator, in hex.
fn new_token() -> Result<String, AgentError> {
    use std::io::Read;
    let path = Path::new("/dev/urandom");
    let mut b = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(AgentError::io("reading", path))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Write the agent-wide bandwidth schedule into `DIR/config.toml` (`set --agent --bandwidth`;
/// `*=0` removes the key): the other keys are kept, comments are not.
pub fn write_bandwidth(
    dir: &Path,
    schedule: &vmr_proto::bandwidth::BandwidthSchedule,
) -> Result<(), AgentError> {
    let value = (!schedule.is_unlimited()).then(|| schedule.to_string());
    write_key(dir, "bandwidth", value)
}

/// Write the data path's CPU priority into `DIR/config.toml` (`set --agent --cpu-priority`;
/// `normal` removes the key).
pub fn write_cpu_priority(
    dir: &Path,
    priority: vmr_proto::api::CpuPriority,
) -> Result<(), AgentError> {
    let value = (!priority.is_normal()).then(|| priority.to_string());
    write_key(dir, "cpu-priority", value)
}

/// Set (or with `None` remove) one top-level string key of `DIR/config.toml`: the other keys
/// are kept, comments are not.
fn write_key(dir: &Path, key: &str, value: Option<String>) -> Result<(), AgentError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|err| AgentError::ConfigUnreadable {
        path: path.clone(),
        dir: dir.to_path_buf(),
        err,
    })?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|source| AgentError::ConfigInvalid {
            path: path.clone(),
            source,
        })?;
    match value {
        None => {
            table.remove(key);
        }
        Some(v) => {
            table.insert(key.to_owned(), toml::Value::String(v));
        }
    }
    let text = toml::to_string_pretty(&table).map_err(AgentError::ConfigEncode)?;
    vmr_durable::write_atomic_mode(&path, text.as_bytes(), 0o600)?;
    Ok(())
}

/// Create the directory, config and identity; return the certificate fingerprint.
pub fn create(
    dir: &Path,
    name: &str,
    listen: &str,
    advertise: Option<&str>,
    storage: Option<PathBuf>,
    metrics: Option<MetricsInit<'_>>,
) -> Result<String, AgentError> {
    if dir.join(CONFIG_FILE).exists() {
        return Err(AgentError::AgentExists {
            dir: dir.to_path_buf(),
        });
    }
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(AgentError::BadAgentName {
            name: name.to_owned(),
        });
    }
    let listen = resolve_listen(listen)?.to_string();
    let metrics_listen = match metrics {
        None => None,
        Some(m) => {
            let addr = resolve_addr("--metrics", m.listen)?;
            if !m.token && !addr.ip().is_loopback() {
                return Err(AgentError::MetricsNeedsToken { listen: addr });
            }
            Some(addr.to_string())
        }
    };
    if let Some(a) = advertise {
        vmr_core::check_probe_target(Some(a), None).map_err(|reason| AgentError::BadAdvertise {
            advertise: a.to_owned(),
            reason,
        })?;
    }
    std::fs::create_dir_all(dir).map_err(AgentError::io("creating", dir))?;
    let dir = std::path::absolute(dir).map_err(AgentError::io("resolving", dir))?;
    let storage = storage.map_or_else(
        || dir.join("replicas"),
        |s| std::path::absolute(&s).unwrap_or(s),
    );
    let identity =
        vmr_transport::Identity::generate(&dir, name).map_err(|source| AgentError::Identity {
            doing: "generating",
            source,
        })?;
    let cfg = AgentConfig {
        name: name.to_owned(),
        listen,
        advertise: advertise.map(str::to_owned),
        storage: storage.display().to_string(),
        max_concurrent_cycles: 8,
        allowed_programs: vmr_proto::api::default_allowed_programs(),
        events: Default::default(),
        metrics_listen,
        metrics_token_file: None,
        bandwidth: None,
        time_zone: Default::default(),
        libvirt_connect: None,
        cpu_priority: Default::default(),
    };
    let mut cfg = cfg;
    if metrics.is_some_and(|m| m.token) {
        let path = dir.join(METRICS_TOKEN_FILE);
        vmr_durable::write_atomic_mode(&path, format!("{}\n", new_token()?).as_bytes(), 0o600)?;
        cfg.metrics_token_file = Some(METRICS_TOKEN_FILE.to_owned());
    }
    let text = toml::to_string_pretty(&cfg).map_err(AgentError::ConfigEncode)?;
    let path = dir.join(CONFIG_FILE);
    vmr_durable::write_atomic_mode(&path, text.as_bytes(), 0o600)?;
    Ok(identity.fingerprint().to_owned())
}

/// The replication listener's address from `init --listen`: an IP address with a port, or a
/// host name with a port, resolved here (the first IPv4 address it resolves to, else the first
/// address; `config.toml` records the address, so the agent binds what `init` printed).
pub fn resolve_listen(listen: &str) -> Result<std::net::SocketAddr, AgentError> {
    resolve_addr("--listen", listen)
}

/// HOST:PORT of setting `flag` (an IP address, or a host name resolved like
/// [`resolve_listen`]'s).
pub fn resolve_addr(flag: &'static str, listen: &str) -> Result<std::net::SocketAddr, AgentError> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = listen.parse::<std::net::SocketAddr>() {
        return Ok(a);
    }
    let bad = || AgentError::BadListen {
        flag,
        listen: listen.to_owned(),
    };
    let (host, port) = listen.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == ':') {
        return Err(bad());
    }
    let unresolved = |source| AgentError::ListenUnresolved {
        flag,
        listen: listen.to_owned(),
        host: host.to_owned(),
        source,
    };
    let addrs: Vec<std::net::SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| unresolved(Some(e)))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| unresolved(None))
}

/// The control socket of the agent owning `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

/// The address this agent reports to its replicas (`replica-info`): the advertised address,
/// else the listen address (a replica replaces a wildcard host by the address the
/// connection came from).
pub fn reported_address(cfg: &AgentConfig) -> String {
    cfg.advertise.clone().unwrap_or_else(|| cfg.listen.clone())
}

/// Client options of this agent's outgoing connections: from its listen address when that
/// is a specific one, so that peers see the address this agent listens on.
pub fn client_options(cfg: &AgentConfig) -> vmr_transport::ClientOptions {
    let bind = cfg
        .listen
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified());
    vmr_transport::ClientOptions {
        bind,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_private_files_and_a_loadable_config() {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path().join("agent");
        create(&d, "host-a", "127.0.0.1:9443", None, None, None).expect("init");
        assert_eq!(mode(&d.join(CONFIG_FILE)), 0o600);
        assert_eq!(mode(&d.join(vmr_transport::KEY_FILE)), 0o600);
        let cfg = load_config(&d).expect("load");
        assert_eq!(
            cfg.allowed_programs,
            vmr_proto::api::default_allowed_programs()
        );
        check_key_mode(&d).expect("0600 key");
        for bad in [0o640, 0o604, 0o666] {
            std::fs::set_permissions(
                d.join(vmr_transport::KEY_FILE),
                std::fs::Permissions::from_mode(bad),
            )
            .expect("chmod");
            let e = check_key_mode(&d).expect_err("exposed key");
            assert!(
                e.to_string().contains(&format!("{bad:o}")) && e.to_string().contains("chmod 600"),
                "{e}"
            );
        }
    }

    #[test]
    fn listen_takes_a_host_name_and_says_when_it_does_not_resolve() {
        let a = resolve_listen("localhost:9443").expect("localhost");
        assert!(a.ip().is_loopback() && a.port() == 9443, "{a}");
        assert_eq!(
            resolve_listen("10.0.0.2:9443").expect("ip").to_string(),
            "10.0.0.2:9443"
        );
        assert_eq!(
            resolve_listen("[::1]:9443").expect("ipv6").to_string(),
            "[::1]:9443"
        );
        let e = resolve_listen("no-such-host.invalid:9443").expect_err("unresolvable");
        assert!(matches!(e, AgentError::ListenUnresolved { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("\"no-such-host.invalid\" does not resolve"),
            "{e}"
        );
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        for bad in ["localhost", "localhost:x", ":9443", "localhost:70000"] {
            let e = resolve_listen(bad).expect_err(bad);
            assert!(matches!(e, AgentError::BadListen { .. }), "{bad}: {e:?}");
        }
        // init records the address the name resolved to.
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path().join("agent");
        create(&d, "host-a", "localhost:9443", None, None, None).expect("init");
        let cfg = load_config(&d).expect("load");
        let l: std::net::SocketAddr = cfg.listen.parse().expect("an address");
        assert!(l.ip().is_loopback() && l.port() == 9443, "{l}");
    }

    #[test]
    fn the_monitoring_listener_needs_a_token_beyond_loopback() {
        let root = tempfile::tempdir().expect("dir");
        // Off by default.
        let d = root.path().join("off");
        create(&d, "a", "127.0.0.1:7000", None, None, None).expect("init");
        assert_eq!(
            metrics_config(&d, &load_config(&d).expect("load")).expect("ok"),
            None
        );
        // Loopback (a host name too) without a token.
        let d = root.path().join("lo");
        let m = MetricsInit {
            listen: "localhost:9464",
            token: false,
        };
        create(&d, "a", "127.0.0.1:7000", None, None, Some(m)).expect("init");
        let mc = metrics_config(&d, &load_config(&d).expect("load"))
            .expect("ok")
            .expect("on");
        assert!(mc.addr.ip().is_loopback() && mc.addr.port() == 9464 && mc.token.is_none());
        // Beyond loopback without a token: refused by init, which creates nothing.
        let d = root.path().join("wild");
        let m = MetricsInit {
            listen: "0.0.0.0:9464",
            token: false,
        };
        let e = create(&d, "a", "127.0.0.1:7000", None, None, Some(m)).expect_err("no token");
        assert!(matches!(e, AgentError::MetricsNeedsToken { .. }), "{e:?}");
        assert!(e.to_string().contains("--metrics-token"), "{e}");
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        assert!(!d.exists());
        // With one: a private token file the config names.
        let m = MetricsInit {
            listen: "0.0.0.0:9464",
            token: true,
        };
        create(&d, "a", "127.0.0.1:7000", None, None, Some(m)).expect("init");
        let cfg = load_config(&d).expect("load");
        assert_eq!(cfg.metrics_token_file.as_deref(), Some(METRICS_TOKEN_FILE));
        assert_eq!(mode(&d.join(METRICS_TOKEN_FILE)), 0o600);
        let mc = metrics_config(&d, &cfg).expect("ok").expect("on");
        assert_eq!(mc.token.as_ref().map(String::len), Some(64));
        // A config edited to drop the token is refused when the agent starts.
        let mut bare = cfg.clone();
        bare.metrics_token_file = None;
        let e = metrics_config(&d, &bare).expect_err("no token");
        assert!(matches!(e, AgentError::MetricsNeedsToken { .. }), "{e:?}");
        // An empty or exposed token file is refused.
        std::fs::write(d.join(METRICS_TOKEN_FILE), "\n").expect("write");
        let e = metrics_config(&d, &cfg).expect_err("empty");
        assert!(matches!(e, AgentError::MetricsToken { .. }), "{e:?}");
        std::fs::set_permissions(
            d.join(METRICS_TOKEN_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let e = metrics_config(&d, &cfg).expect_err("exposed");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        // A bad address names the setting.
        let e = create(
            &root.path().join("bad"),
            "a",
            "127.0.0.1:7000",
            None,
            None,
            Some(MetricsInit {
                listen: "nowhere",
                token: false,
            }),
        )
        .expect_err("bad");
        assert!(e.to_string().starts_with("--metrics \"nowhere\""), "{e}");
    }

    #[test]
    fn zero_concurrent_cycles_is_a_config_error() {
        let dir = tempfile::tempdir().expect("dir");
        let text =
            "name = \"a\"\nlisten = \"127.0.0.1:1\"\nstorage = \"/s\"\nmax-concurrent-cycles = 0\n";
        std::fs::write(dir.path().join(CONFIG_FILE), text).expect("write");
        let e = load_config(dir.path()).expect_err("0");
        let text = e.to_string();
        assert!(
            text.contains("max-concurrent-cycles") && text.contains("config.toml"),
            "{text}"
        );
    }

    #[test]
    fn vm_names_are_validated() {
        for ok in ["web1", "db server", "ünïcode-vm", &"x".repeat(64)] {
            validate_vm_name(ok).expect(ok);
        }
        for bad in [
            "",
            "a\nb",
            "tab\there",
            "esc\u{1b}[31m",
            "a/b",
            " lead",
            &"x".repeat(65),
            &"y".repeat(4096),
        ] {
            let e = validate_vm_name(bad).expect_err(bad);
            assert_eq!(e.exit_code(), crate::exit::USAGE, "{bad:?}");
            // The message never carries the raw control characters or the whole name.
            let text = e.to_string();
            assert!(!text.contains('\n') && text.len() < 300, "{text}");
        }
    }

    #[test]
    fn advertise_is_validated_and_reported() {
        let root = tempfile::tempdir().expect("tempdir");
        for bad in [
            "0.0.0.0:7000",
            "[::]:7000",
            "host-without-port",
            "10.0.0.1:0",
        ] {
            let e = create(
                &root.path().join("x"),
                "a",
                "0.0.0.0:7000",
                Some(bad),
                None,
                None,
            )
            .expect_err(bad);
            assert!(matches!(e, AgentError::BadAdvertise { .. }), "{bad}: {e}");
            assert_eq!(e.exit_code(), crate::exit::USAGE);
            assert!(!root.path().join("x").exists(), "nothing created for {bad}");
        }
        let dir = root.path().join("a");
        create(&dir, "a", "0.0.0.0:7000", Some("10.0.0.5:7000"), None, None).expect("create");
        let cfg = load_config(&dir).expect("load");
        assert_eq!(reported_address(&cfg), "10.0.0.5:7000");
        assert_eq!(
            client_options(&cfg).bind,
            None,
            "a wildcard listener binds nothing"
        );
        let dir = root.path().join("b");
        create(&dir, "b", "127.0.0.2:7000", None, None, None).expect("create");
        let cfg = load_config(&dir).expect("load");
        assert_eq!(reported_address(&cfg), "127.0.0.2:7000");
        assert_eq!(client_options(&cfg).bind, "127.0.0.2".parse().ok());
    }
}
