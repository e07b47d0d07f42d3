//! Types every Outpost binary agrees on. No I/O, no async runtime, no Kubernetes types.

pub mod config;
pub mod digest;
pub mod image;
pub mod keys;
pub mod nscred;
pub mod pattern;
pub mod reference;

pub use config::{ConfigError, Host, HostError, MirrorConfig, MirrorRule};
pub use digest::{Algorithm, Digest, DigestError};
pub use image::{ImageError, ImageReference};
pub use keys::{KeyFileError, SigningKeys};
pub use nscred::{NamespaceCredential, NsCredError};
pub use pattern::{PatternError, RepositoryPattern};
pub use reference::{NameError, Reference, RepositoryName, Tag};
