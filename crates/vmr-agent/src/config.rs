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
    toml::from_str(&text).map_err(|source| AgentError::ConfigInvalid { path, source })
}

/// Create the directory, config and identity; return the certificate fingerprint.
pub fn create(
    dir: &Path,
    name: &str,
    listen: &str,
    advertise: Option<&str>,
    storage: Option<PathBuf>,
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
    listen
        .parse::<std::net::SocketAddr>()
        .map_err(|err| AgentError::BadListen {
            listen: listen.to_owned(),
            err,
        })?;
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
        listen: listen.to_owned(),
        advertise: advertise.map(str::to_owned),
        storage: storage.display().to_string(),
        max_concurrent_cycles: 8,
    };
    let text = toml::to_string_pretty(&cfg).map_err(AgentError::ConfigEncode)?;
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, text).map_err(AgentError::io("writing", &path))?;
    Ok(identity.fingerprint().to_owned())
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

    #[test]
    fn advertise_is_validated_and_reported() {
        let root = tempfile::tempdir().expect("tempdir");
        for bad in [
            "0.0.0.0:7000",
            "[::]:7000",
            "host-without-port",
            "10.0.0.1:0",
        ] {
            let e = create(&root.path().join("x"), "a", "0.0.0.0:7000", Some(bad), None)
                .expect_err(bad);
            assert!(matches!(e, AgentError::BadAdvertise { .. }), "{bad}: {e}");
            assert_eq!(e.exit_code(), crate::exit::USAGE);
            assert!(!root.path().join("x").exists(), "nothing created for {bad}");
        }
        let dir = root.path().join("a");
        create(&dir, "a", "0.0.0.0:7000", Some("10.0.0.5:7000"), None).expect("create");
        let cfg = load_config(&dir).expect("load");
        assert_eq!(reported_address(&cfg), "10.0.0.5:7000");
        assert_eq!(
            client_options(&cfg).bind,
            None,
            "a wildcard listener binds nothing"
        );
        let dir = root.path().join("b");
        create(&dir, "b", "127.0.0.2:7000", None, None).expect("create");
        let cfg = load_config(&dir).expect("load");
        assert_eq!(reported_address(&cfg), "127.0.0.2:7000");
        assert_eq!(client_options(&cfg).bind, "127.0.0.2".parse().ok());
    }
}
