//! Image references as pod specs write them (`nginx`, `myacr.azurecr.io/team/app:1.2@sha256:…`),
//! parsed by the Docker reference grammar and normalised the way container runtimes resolve
//! them: a first path component is a registry host only if it contains `.` or `:` or is
//! `localhost`; otherwise the image is on Docker Hub, where one-component names live under
//! `library/`. Docker Hub's aliases (`index.docker.io`, `registry-1.docker.io`) become
//! `docker.io`.
//!
//! Unlike Docker, a host with upper-case letters is refused rather than lower-cased: the
//! runtime would not resolve it the way the text reads, so such a reference is left alone.

use std::fmt;
use std::str::FromStr;

use crate::config::Host;
use crate::digest::{Digest, DigestError};
use crate::reference::{MAX_NAME_LEN, NameError, RepositoryName, Tag};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {0:?} contains whitespace or control characters")]
    BadCharacter(String),
    #[error("image reference {0:?} has an invalid registry host")]
    BadHost(String),
    #[error("image reference {reference:?}: {source}")]
    Name {
        reference: String,
        #[source]
        source: NameError,
    },
    #[error("image reference {reference:?}: {source}")]
    Digest {
        reference: String,
        #[source]
        source: DigestError,
    },
    #[error("image reference {0:?}: the name is longer than {MAX_NAME_LEN} characters")]
    TooLong(String),
}

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    host: Host,
    repository: RepositoryName,
    tag: Option<Tag>,
    digest: Option<Digest>,
}

impl ImageReference {
    /// The registry host, canonical (`docker.io` for every Docker Hub spelling).
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The repository path at that host (`library/nginx` for `nginx`).
    pub fn repository(&self) -> &RepositoryName {
        &self.repository
    }

    pub fn tag(&self) -> Option<&Tag> {
        self.tag.as_ref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What a runtime asks the registry's `/manifests/` for: the digest when there is one
    /// (a runtime pulls `repo:tag@digest` by digest), else the tag, else `latest`.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The same repository, tag and digest on another registry host.
    pub fn with_host(&self, host: &Host) -> ImageReference {
        ImageReference {
            host: host.clone(),
            ..self.clone()
        }
    }
}

/// Writes the normalised form: `host/repository[:tag][@digest]`, no implicit `latest` added.
impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The Docker grammar's test for "this first component names a registry".
fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

impl FromStr for ImageReference {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ImageError::Empty);
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ImageError::BadCharacter(s.to_owned()));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let digest = d.parse::<Digest>().map_err(|source| ImageError::Digest {
                    reference: s.to_owned(),
                    source,
                })?;
                (n, Some(digest))
            }
            None => (s, None),
        };
        // A tag's ':' comes after the last '/', so a host's port is never mistaken for one.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                let tag = name_tag[at + 1..]
                    .parse::<Tag>()
                    .map_err(|source| ImageError::Name {
                        reference: s.to_owned(),
                        source,
                    })?;
                (&name_tag[..at], Some(tag))
            }
            None => (name_tag, None),
        };
        let (host, path) = match name.split_once('/') {
            Some((first, rest)) if looks_like_host(first) => {
                let host = first
                    .parse::<Host>()
                    .map_err(|_| ImageError::BadHost(s.to_owned()))?;
                (host.canonical(), rest.to_owned())
            }
            _ => {
                // A bare `localhost:5000` or `registry.io` without a path is a Docker Hub
                // name only if it is a valid one; RepositoryName decides below.
                let hub: Host = crate::config::DOCKER_HUB
                    .parse()
                    .map_err(|_| ImageError::BadHost(s.to_owned()))?;
                (hub, name.to_owned())
            }
        };
        let path = if host.is_docker_hub() && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if path.len() > MAX_NAME_LEN {
            return Err(ImageError::TooLong(s.to_owned()));
        }
        let repository = path
            .parse::<RepositoryName>()
            .map_err(|source| ImageError::Name {
                reference: s.to_owned(),
                source,
            })?;
        Ok(ImageReference {
            host,
            repository,
            tag,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn norm(s: &str) -> String {
        s.parse::<ImageReference>()
            .map(|r| r.to_string())
            .unwrap_or_else(|e| format!("error: {e}"))
    }

    #[test]
    fn normalises_docker_hub_names() {
        for (input, want) in [
            ("nginx", "docker.io/library/nginx"),
            ("nginx:1.27", "docker.io/library/nginx:1.27"),
            ("library/nginx", "docker.io/library/nginx"),
            ("docker.io/nginx", "docker.io/library/nginx"),
            (
                "docker.io/library/nginx:latest",
                "docker.io/library/nginx:latest",
            ),
            ("index.docker.io/nginx", "docker.io/library/nginx"),
            (
                "registry-1.docker.io/bitnami/redis:7",
                "docker.io/bitnami/redis:7",
            ),
            ("bitnami/redis", "docker.io/bitnami/redis"),
            ("a/b/c", "docker.io/a/b/c"),
        ] {
            assert_eq!(norm(input), want, "{input}");
        }
    }

    #[test]
    fn hosts_ports_tags_digests() {
        let with_digest = format!("ghcr.io/org/app:v1@{D}");
        assert_eq!(norm(&with_digest), with_digest);
        assert_eq!(
            norm(&format!("localhost:5000/app@{D}")),
            format!("localhost:5000/app@{D}")
        );
        assert_eq!(norm("localhost/app"), "localhost/app");
        assert_eq!(
            norm("registry.local:5000/a/b:c"),
            "registry.local:5000/a/b:c"
        );
        assert_eq!(norm("[fd00::1]:5000/app:1"), "[fd00::1]:5000/app:1");
        // A bare registry-looking name without a path is a Docker Hub name with a tag.
        assert_eq!(norm("localhost:5000"), "docker.io/library/localhost:5000");
        let r: ImageReference = format!("nginx:1@{D}").parse().unwrap();
        assert_eq!(r.manifest_reference(), D);
        let r: ImageReference = "nginx".parse().unwrap();
        assert_eq!(r.manifest_reference(), "latest");
        assert_eq!(r.repository().as_str(), "library/nginx");
    }

    #[test]
    fn refuses_invalid_references() {
        for bad in [
            "",
            "Nginx",
            "MyRegistry.io/app",
            "registry.io/App",
            "nginx:",
            "nginx@sha256:abc",
            "nginx@md5:0123",
            "registry.io:0/app",
            "a b",
            "nginx:-bad",
            "registry.io//app",
            "registry.io/app/",
        ] {
            assert!(bad.parse::<ImageReference>().is_err(), "{bad:?}");
        }
        let long = format!("r.io/{}", "a".repeat(300));
        assert!(matches!(
            long.parse::<ImageReference>(),
            Err(ImageError::TooLong(_))
        ));
    }
}
