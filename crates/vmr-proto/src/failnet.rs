//! Failover network settings (Hyper-V's "Failover TCP/IP"): the addresses, gateways and DNS
//! servers a VM's interfaces get when a real failover starts the VM on this host, and the
//! QEMU network arguments that replace the definition's `network-args` here. They belong to
//! the host (each host keeps its own for the VM), are set with `vm set`, and are never used
//! for a test failover.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// What `vm set --failover-*` records for one VM on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverSettings {
    /// Per interface; empty = leave the guest's network configuration as it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<FailoverInterface>,
    /// Replaces the definition's `network-args` when a real failover starts the VM here
    /// (another bridge, another VLAN); `None` = the definition's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_args: Option<Vec<String>>,
}

impl FailoverSettings {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty() && self.network_args.is_none()
    }
}

/// The settings of one guest interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverInterface {
    /// The interface's MAC address (lower case, `aa:bb:cc:dd:ee:ff`); `None` = the guest's only
    /// Ethernet interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Static addresses with prefix length (`10.2.0.5/24`, `fd00::5/64`).
    #[serde(default)]
    pub addresses: Vec<IpPrefix>,
    /// Default gateways (at most one per address family).
    #[serde(default)]
    pub gateways: Vec<IpAddr>,
    /// DNS servers.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPrefix {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub prefix: u8,
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a failover network setting is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailnetError {
    /// `ADDR/PREFIX` expected.
    #[error("{value:?} is not an address with a prefix length (10.2.0.5/24, fd00::5/64)")]
    Prefix {
        /// What was given.
        value: String,
    },
    /// Not an IPv4 or IPv6 address.
    #[error("{value:?} is not an IPv4 or IPv6 address")]
    Address {
        /// What was given.
        value: String,
    },
    /// Not `aa:bb:cc:dd:ee:ff`.
    #[error("{value:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")]
    Mac {
        /// What was given.
        value: String,
    },
    /// A gateway or DNS server for an interface without an address of its family.
    #[error("interface {iface}: gateway {gateway} has no address of its family on that interface")]
    GatewayWithoutAddress {
        /// The interface (MAC or "the only interface").
        iface: String,
        /// The gateway.
        gateway: IpAddr,
    },
    /// Two gateways of one family on one interface.
    #[error("interface {iface}: more than one {family} gateway")]
    TwoGateways {
        /// The interface.
        iface: String,
        /// "IPv4" or "IPv6".
        family: &'static str,
    },
    /// An interface with a gateway or DNS server but no address.
    #[error("interface {iface}: a gateway or DNS server needs an address (--failover-ip)")]
    NoAddress {
        /// The interface.
        iface: String,
    },
    /// Settings without a MAC beside settings with one.
    #[error(
        "settings without a MAC apply to the guest's only interface: they cannot be mixed with \
         settings for interfaces named by MAC"
    )]
    MixedMac,
    /// A network argument with a control character.
    #[error("network argument {arg:?} has a control character")]
    BadArg {
        /// The argument.
        arg: String,
    },
}

/// One `--failover-ip` / `--failover-gateway` / `--failover-dns` value: `[MAC=]VALUE`.
fn split_mac(value: &str) -> Result<(Option<String>, &str), FailnetError> {
    // An IPv6 address has colons but never '='.
    match value.split_once('=') {
        Some((mac, rest)) => Ok((Some(parse_mac(mac)?), rest)),
        None => Ok((None, value)),
    }
}

/// A MAC address, normalised to lower case.
pub fn parse_mac(value: &str) -> Result<String, FailnetError> {
    let bad = || FailnetError::Mac {
        value: value.to_owned(),
    };
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(bad());
    }
    Ok(value.to_ascii_lowercase())
}

fn parse_prefix(value: &str) -> Result<IpPrefix, FailnetError> {
    let bad = || FailnetError::Prefix {
        value: value.to_owned(),
    };
    let (a, p) = value.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok(IpPrefix { addr, prefix })
}

fn parse_addr(value: &str) -> Result<IpAddr, FailnetError> {
    value.parse().map_err(|_| FailnetError::Address {
        value: value.to_owned(),
    })
}

impl FailoverSettings {
    /// Build the interface settings from the command line's `[MAC=]VALUE` lists and check
    /// them. Values are grouped by MAC in the order the MACs first appear.
    pub fn interfaces_from_args(
        ips: &[String],
        gateways: &[String],
        dns: &[String],
    ) -> Result<Vec<FailoverInterface>, FailnetError> {
        let mut out: Vec<FailoverInterface> = Vec::new();
        fn slot(out: &mut Vec<FailoverInterface>, mac: Option<String>) -> &mut FailoverInterface {
            let i = match out.iter().position(|x| x.mac == mac) {
                Some(i) => i,
                None => {
                    out.push(FailoverInterface {
                        mac,
                        ..Default::default()
                    });
                    out.len() - 1
                }
            };
            &mut out[i]
        }
        for v in ips {
            let (mac, rest) = split_mac(v)?;
            let p = parse_prefix(rest)?;
            slot(&mut out, mac).addresses.push(p);
        }
        for v in gateways {
            let (mac, rest) = split_mac(v)?;
            let a = parse_addr(rest)?;
            slot(&mut out, mac).gateways.push(a);
        }
        for v in dns {
            let (mac, rest) = split_mac(v)?;
            let a = parse_addr(rest)?;
            slot(&mut out, mac).dns.push(a);
        }
        let s = FailoverSettings {
            interfaces: out,
            network_args: None,
        };
        s.validate()?;
        Ok(s.interfaces)
    }

    /// Check the settings (also those read back from a record or a request).
    pub fn validate(&self) -> Result<(), FailnetError> {
        let unnamed = self.interfaces.iter().filter(|i| i.mac.is_none()).count();
        if unnamed > 1 || (unnamed == 1 && self.interfaces.len() > 1) {
            return Err(FailnetError::MixedMac);
        }
        for i in &self.interfaces {
            let iface = i.label();
            if let Some(m) = &i.mac {
                parse_mac(m)?;
            }
            for p in &i.addresses {
                let max = if p.addr.is_ipv4() { 32 } else { 128 };
                if p.prefix > max {
                    return Err(FailnetError::Prefix {
                        value: p.to_string(),
                    });
                }
            }
            if i.addresses.is_empty() {
                return Err(FailnetError::NoAddress { iface });
            }
            for (family, v4) in [("IPv4", true), ("IPv6", false)] {
                let gws: Vec<&IpAddr> = i.gateways.iter().filter(|g| g.is_ipv4() == v4).collect();
                if gws.len() > 1 {
                    return Err(FailnetError::TwoGateways {
                        iface: iface.clone(),
                        family,
                    });
                }
                if let Some(g) = gws.first()
                    && !i.addresses.iter().any(|a| a.addr.is_ipv4() == v4)
                {
                    return Err(FailnetError::GatewayWithoutAddress {
                        iface: iface.clone(),
                        gateway: **g,
                    });
                }
            }
        }
        if let Some(args) = &self.network_args
            && let Some(a) = args.iter().find(|a| a.chars().any(char::is_control))
        {
            return Err(FailnetError::BadArg { arg: a.clone() });
        }
        Ok(())
    }
}

impl FailoverInterface {
    /// How the interface is named in messages.
    pub fn label(&self) -> String {
        match &self.mac {
            Some(m) => m.clone(),
            None => "the only interface".to_owned(),
        }
    }
}

impl std::fmt::Display for FailoverInterface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.label())?;
        for a in &self.addresses {
            write!(f, " {a}")?;
        }
        for g in &self.gateways {
            write!(f, " via {g}")?;
        }
        if !self.dns.is_empty() {
            let d: Vec<String> = self.dns.iter().map(IpAddr::to_string).collect();
            write!(f, " dns {}", d.join(","))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn one_interface_without_mac() {
        let i = FailoverSettings::interfaces_from_args(
            &s(&["10.2.0.5/24", "fd00::5/64"]),
            &s(&["10.2.0.1", "fd00::1"]),
            &s(&["10.2.0.2"]),
        )
        .expect("valid");
        assert_eq!(i.len(), 1);
        assert_eq!(i[0].mac, None);
        assert_eq!(i[0].addresses.len(), 2);
        assert_eq!(
            i[0].to_string(),
            "the only interface: 10.2.0.5/24 fd00::5/64 via 10.2.0.1 via fd00::1 dns 10.2.0.2"
        );
    }

    #[test]
    fn grouped_by_mac() {
        let i = FailoverSettings::interfaces_from_args(
            &s(&[
                "52:54:00:AA:00:01=10.2.0.5/24",
                "52:54:00:aa:00:02=10.3.0.5/16",
            ]),
            &s(&["52:54:00:aa:00:01=10.2.0.1"]),
            &[],
        )
        .expect("valid");
        assert_eq!(i.len(), 2);
        assert_eq!(i[0].mac.as_deref(), Some("52:54:00:aa:00:01"));
        assert_eq!(i[0].gateways.len(), 1);
        assert_eq!(i[1].addresses[0].prefix, 16);
    }

    #[test]
    fn refusals() {
        let cases: &[(&[&str], &[&str], &[&str])] = &[
            (&["10.2.0.5"], &[], &[]),
            (&["10.2.0.5/33"], &[], &[]),
            (&["fd00::5/129"], &[], &[]),
            (&["nonsense/24"], &[], &[]),
            (&["52:54:00:aa:00=10.2.0.5/24"], &[], &[]),
            (&["10.2.0.5/24"], &["fd00::1"], &[]),
            (&["10.2.0.5/24"], &["10.2.0.1", "10.2.0.254"], &[]),
            (&[], &["10.2.0.1"], &[]),
            (&["10.2.0.5/24", "52:54:00:aa:00:01=10.3.0.5/24"], &[], &[]),
            (&["10.2.0.5/24"], &[], &["dns.example"]),
        ];
        for (ip, gw, dns) in cases {
            assert!(
                FailoverSettings::interfaces_from_args(&s(ip), &s(gw), &s(dns)).is_err(),
                "{ip:?} {gw:?} {dns:?}"
            );
        }
    }

    #[test]
    fn round_trip() {
        let set = FailoverSettings {
            interfaces: FailoverSettings::interfaces_from_args(
                &s(&["10.2.0.5/24"]),
                &s(&["10.2.0.1"]),
                &[],
            )
            .expect("valid"),
            network_args: Some(s(&["-netdev", "bridge,id=net0,br=br1"])),
        };
        let j = serde_json::to_string(&set).expect("json");
        let back: FailoverSettings = serde_json::from_str(&j).expect("parse");
        assert_eq!(back, set);
        back.validate().expect("valid");
    }
}
