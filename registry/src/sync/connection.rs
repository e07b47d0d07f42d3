//! The connection string in Azure's format, accepted verbatim so the output of
//! `az acr connected-registry get-settings` works:
//! `ConnectedRegistryName=..;SyncTokenName=..;SyncTokenPassword=..;ParentGatewayEndpoint=..;ParentEndpointProtocol=https`

use std::fmt;
use std::str::FromStr;

use crate::auth::tokens::valid_name;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Https,
    Http,
}

impl Protocol {
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Https => "https",
            Protocol::Http => "http",
        }
    }
}

/// A parsed connection string. Its `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    pub registry_name: String,
    pub sync_token_name: String,
    pub sync_token_password: String,
    /// `host[:port]` of the parent as given.
    pub parent_endpoint: String,
    pub protocol: Protocol,
    /// Keys present but not understood (reported as warnings by the caller).
    pub unknown_keys: Vec<String>,
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("registry_name", &self.registry_name)
            .field("sync_token_name", &self.sync_token_name)
            .field("sync_token_password", &"<redacted>")
            .field("parent_endpoint", &self.parent_endpoint)
            .field("protocol", &self.protocol)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("connection string lacks {0}")]
    Missing(&'static str),
    #[error("connection string gives {0} more than once")]
    Duplicate(&'static str),
    #[error("connection string has an invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("connection string part {index} is not KEY=VALUE")]
    Malformed { index: usize },
}

const KEYS: [&str; 5] = [
    "ConnectedRegistryName",
    "SyncTokenName",
    "SyncTokenPassword",
    "ParentGatewayEndpoint",
    "ParentEndpointProtocol",
];

/// Checks `host[:port]`: a DNS name, an IPv4 address or a bracketed IPv6 address.
fn valid_endpoint(e: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = e.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '[' in IPv6 address")?;
        h.parse::<std::net::Ipv6Addr>()
            .map_err(|_| "not an IPv6 address inside [ ]")?;
        (None, after.strip_prefix(':'))
    } else {
        match e.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(e), None),
        }
    };
    if let Some(h) = host {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err("expected host[:port] (no scheme, no path)".into());
        }
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {}
            _ => return Err(format!("port {p:?} is not 1-65535")),
        }
    }
    Ok(())
}

impl ConnectionString {
    /// The parent's login server: an ACR data endpoint
    /// (`<registry>.<region>.data.azurecr.io`) maps to `<registry>.azurecr.io`; anything else
    /// is used as given.
    pub fn login_server(&self) -> String {
        let e = &self.parent_endpoint;
        let labels: Vec<&str> = e.split('.').collect();
        let n = labels.len();
        if n >= 5 && labels[n - 3] == "data" && labels[n - 2] == "azurecr" {
            // registry . region . data . azurecr . tld
            return format!("{}.azurecr.{}", labels[..n - 4].join("."), labels[n - 1]);
        }
        e.clone()
    }

    /// Base URL of the parent's registry API.
    pub fn parent_url(&self) -> String {
        format!("{}://{}", self.protocol.scheme(), self.login_server())
    }
}

impl FromStr for ConnectionString {
    type Err = ConnectionStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut values: [Option<String>; 5] = Default::default();
        let mut unknown_keys = Vec::new();
        for (index, part) in s.trim().split(';').enumerate() {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            // Split at the first '=': passwords may themselves contain '='.
            let (k, v) = part
                .split_once('=')
                .ok_or(ConnectionStringError::Malformed { index: index + 1 })?;
            let k = k.trim();
            match KEYS.iter().position(|known| known.eq_ignore_ascii_case(k)) {
                Some(i) => {
                    if values[i].is_some() {
                        return Err(ConnectionStringError::Duplicate(KEYS[i]));
                    }
                    values[i] = Some(v.trim().to_owned());
                }
                None => unknown_keys.push(k.to_owned()),
            }
        }
        let [name, token, password, endpoint, protocol] = values;
        let name = name.ok_or(ConnectionStringError::Missing(KEYS[0]))?;
        let token = token.ok_or(ConnectionStringError::Missing(KEYS[1]))?;
        let password = password.ok_or(ConnectionStringError::Missing(KEYS[2]))?;
        let endpoint = endpoint.ok_or(ConnectionStringError::Missing(KEYS[3]))?;
        let protocol = protocol.ok_or(ConnectionStringError::Missing(KEYS[4]))?;
        for (key, v) in [(KEYS[0], &name), (KEYS[1], &token)] {
            if !valid_name(v) {
                return Err(ConnectionStringError::Invalid {
                    key,
                    reason: "expected 1-50 of A-Z a-z 0-9 - _".into(),
                });
            }
        }
        if password.is_empty() {
            // The reason never quotes the value.
            return Err(ConnectionStringError::Invalid {
                key: KEYS[2],
                reason: "empty".into(),
            });
        }
        valid_endpoint(&endpoint).map_err(|reason| ConnectionStringError::Invalid {
            key: KEYS[3],
            reason,
        })?;
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "https" => Protocol::Https,
            "http" => Protocol::Http,
            _ => {
                return Err(ConnectionStringError::Invalid {
                    key: KEYS[4],
                    reason: "expected https or http".into(),
                });
            }
        };
        Ok(ConnectionString {
            registry_name: name,
            sync_token_name: token,
            sync_token_password: password,
            parent_endpoint: endpoint,
            protocol,
            unknown_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AZ: &str = "ConnectedRegistryName=myconnectedregistry;SyncTokenName=myconnectedregistry-sync-token;SyncTokenPassword=xxxxxxxx/yyyy+zz==;ParentGatewayEndpoint=myacr.eastus.data.azurecr.io;ParentEndpointProtocol=https";

    #[test]
    fn azure_output_parses_verbatim() {
        let c: ConnectionString = AZ.parse().unwrap();
        assert_eq!(c.registry_name, "myconnectedregistry");
        assert_eq!(c.sync_token_name, "myconnectedregistry-sync-token");
        assert_eq!(c.sync_token_password, "xxxxxxxx/yyyy+zz==");
        assert_eq!(c.protocol, Protocol::Https);
        assert_eq!(c.login_server(), "myacr.azurecr.io");
        assert_eq!(c.parent_url(), "https://myacr.azurecr.io");
        assert!(c.unknown_keys.is_empty());
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_ones_kept_aside() {
        let s = "connectedregistryname=child;SYNCTOKENNAME=t;synctokenpassword=p;parentgatewayendpoint=10.0.0.5:5000;parentendpointprotocol=HTTP;Extra=1;";
        let c: ConnectionString = s.parse().unwrap();
        assert_eq!(c.protocol, Protocol::Http);
        assert_eq!(c.login_server(), "10.0.0.5:5000");
        assert_eq!(c.unknown_keys, vec!["Extra"]);
    }

    #[test]
    fn errors_name_the_key_and_never_the_password() {
        let without = |key: &str| -> String {
            AZ.split(';')
                .filter(|p| !p.starts_with(key))
                .collect::<Vec<_>>()
                .join(";")
        };
        for key in KEYS {
            let e = without(key).parse::<ConnectionString>().unwrap_err();
            assert_eq!(e, ConnectionStringError::Missing(key));
        }
        let bad = AZ.replace("ParentEndpointProtocol=https", "ParentEndpointProtocol=ftp");
        assert!(
            bad.parse::<ConnectionString>()
                .unwrap_err()
                .to_string()
                .contains("ParentEndpointProtocol")
        );
        let bad = AZ.replace(
            "myacr.eastus.data.azurecr.io",
            "https://myacr.azurecr.io/v2",
        );
        let e = bad.parse::<ConnectionString>().unwrap_err().to_string();
        assert!(e.contains("ParentGatewayEndpoint"), "{e}");
        let bad = AZ.replace("SyncTokenPassword=xxxxxxxx/yyyy+zz==", "SyncTokenPassword=");
        let e = bad.parse::<ConnectionString>().unwrap_err().to_string();
        assert!(e.contains("SyncTokenPassword") && !e.contains("xxxx"));
        let twice = format!("{AZ};SyncTokenName=again");
        assert_eq!(
            twice.parse::<ConnectionString>().unwrap_err(),
            ConnectionStringError::Duplicate("SyncTokenName")
        );
        assert!(matches!(
            "justtext".parse::<ConnectionString>().unwrap_err(),
            ConnectionStringError::Malformed { index: 1 }
        ));
        let c: ConnectionString = AZ.parse().unwrap();
        assert!(!format!("{c:?}").contains("xxxx"));
    }

    #[test]
    fn endpoints() {
        for ok in [
            "parent",
            "parent:5000",
            "a.b.c",
            "[::1]:5000",
            "192.168.0.10",
            "x.westeurope.data.azurecr.cn",
        ] {
            assert!(valid_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "http://x", "x/y", "x:0", "x:99999", "-x", "[::1", "a..b",
        ] {
            assert!(valid_endpoint(bad).is_err(), "{bad}");
        }
        let c: ConnectionString = AZ
            .replace(
                "myacr.eastus.data.azurecr.io",
                "reg.chinaeast2.data.azurecr.cn",
            )
            .parse()
            .unwrap();
        assert_eq!(c.login_server(), "reg.azurecr.cn");
    }
}
