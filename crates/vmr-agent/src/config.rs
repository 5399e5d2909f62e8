//! An agent directory: its config file, creating it with a TLS identity (`vmreplica init`),
//! and the control socket's path.

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
