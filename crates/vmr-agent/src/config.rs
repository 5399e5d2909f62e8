//! An agent directory: its config file, creating it with a TLS identity (`vmreplica init`),
//! and the control socket's path.

use std::path::{Path, PathBuf};

use anyhow::Context;
use vmr_proto::api::AgentConfig;

use crate::exit;
use crate::util::coded;

/// Name of the config file in the agent directory.
pub const CONFIG_FILE: &str = "config.toml";

/// Load `DIR/config.toml`.
pub fn load_config(dir: &Path) -> anyhow::Result<AgentConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        coded(
            exit::FAILURE,
            format!(
                "cannot read {} ({e}); run `vmreplica init --dir {}` first",
                path.display(),
                dir.display()
            ),
        )
    })?;
    toml::from_str(&text).with_context(|| format!("{} is not a valid agent config", path.display()))
}

/// Create the directory, config and identity; return the certificate fingerprint.
pub fn create(
    dir: &Path,
    name: &str,
    listen: &str,
    storage: Option<PathBuf>,
) -> anyhow::Result<String> {
    if dir.join(CONFIG_FILE).exists() {
        return Err(coded(
            exit::INVALID_STATE,
            format!(
                "{} already holds an agent (config.toml exists)",
                dir.display()
            ),
        ));
    }
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(coded(exit::USAGE, format!("bad agent name {name:?}")));
    }
    listen.parse::<std::net::SocketAddr>().map_err(|e| {
        coded(
            exit::USAGE,
            format!("--listen {listen:?} is not HOST:PORT ({e})"),
        )
    })?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::path::absolute(dir)?;
    let storage = storage.map_or_else(
        || dir.join("replicas"),
        |s| std::path::absolute(&s).unwrap_or(s),
    );
    let identity =
        vmr_transport::Identity::generate(&dir, name).context("generating the TLS identity")?;
    let cfg = AgentConfig {
        name: name.to_owned(),
        listen: listen.to_owned(),
        storage: storage.display().to_string(),
        max_concurrent_cycles: 8,
    };
    let text = toml::to_string_pretty(&cfg)?;
    std::fs::write(dir.join(CONFIG_FILE), text).context("writing config.toml")?;
    Ok(identity.fingerprint().to_owned())
}

/// The control socket of the agent owning `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}
