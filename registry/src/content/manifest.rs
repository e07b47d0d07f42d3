//! What a manifest is: its media types, the content it references, its subject. Parsed once
//! at push time; storage is only asked to link what passes here.

use outpost_core::Digest;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::platform::{self, Child, Platform};
use crate::storage::Descriptor;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Media types a manifest may have here, in the order offered when a client names none.
pub const MANIFEST_TYPES: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// The largest manifest accepted, as the OCI distribution spec recommends.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("Docker schema 1 manifests are not supported; push schema 2 or OCI")]
    Schema1,
    #[error("schemaVersion must be 2")]
    SchemaVersion,
    #[error("unsupported manifest media type {0:?}")]
    UnknownMediaType(String),
    #[error("mediaType {field:?} in the manifest does not match Content-Type {header:?}")]
    MediaTypeMismatch { field: String, header: String },
    #[error("cannot tell the manifest's media type: set mediaType or Content-Type")]
    NoMediaType,
    #[error("{0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: i64,
    #[serde(default)]
    urls: Option<Vec<String>>,
    /// Read leniently (a `Value`): an odd platform or annotation must not make a manifest that
    /// was valid before the platform filter existed invalid now.
    #[serde(default)]
    platform: Option<Value>,
    #[serde(default)]
    annotations: Option<Value>,
}

impl RawDescriptor {
    /// `platform.os` and `platform.architecture` (with `variant`), when both are strings.
    fn platform(&self) -> Option<Platform> {
        let p = self.platform.as_ref()?.as_object()?;
        let field = |k: &str| p.get(k).and_then(Value::as_str);
        Some(Platform::new(
            field("os")?,
            field("architecture")?,
            field("variant"),
        ))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    annotations: Option<Map<String, Value>>,
}

/// A validated manifest and what it points at.
#[derive(Debug)]
pub struct ParsedManifest {
    pub media_type: String,
    /// Config and layers that must be in the repository (non-distributable layers excluded).
    pub blobs: Vec<Digest>,
    /// Every blob digest the manifest names, including non-distributable ones (kept by gc).
    pub all_blobs: Vec<Digest>,
    /// `blobs` with the sizes their descriptors declare (what a download must fetch).
    pub blob_sizes: Vec<(Digest, u64)>,
    /// Child manifests of an index.
    pub manifests: Vec<Digest>,
    /// The same children with what their descriptors say (platform, size), in index order.
    pub children: Vec<Child>,
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
    pub annotations: Option<Map<String, Value>>,
}

impl ParsedManifest {
    /// Everything the manifest names (every blob, non-distributable ones too, and every
    /// child), as the store's reference index records it.
    pub fn names(&self) -> Vec<Digest> {
        self.all_blobs
            .iter()
            .chain(&self.manifests)
            .cloned()
            .collect()
    }

    /// The descriptor the referrers API lists for this manifest.
    pub fn referrer_descriptor(&self, digest: &Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: digest.clone(),
            size,
            artifact_type: self.artifact_type.clone(),
            annotations: self.annotations.clone(),
        }
    }
}

fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

fn descriptor_digest(d: &RawDescriptor, what: &str) -> Result<Digest, ManifestError> {
    if d.size < 0 {
        return Err(ManifestError::Invalid(format!(
            "{what} has a negative size"
        )));
    }
    if d.media_type.as_deref().is_none_or(str::is_empty) {
        return Err(ManifestError::Invalid(format!("{what} has no mediaType")));
    }
    d.digest
        .parse()
        .map_err(|e| ManifestError::Invalid(format!("{what} digest {:?}: {e}", d.digest)))
}

/// Parses and validates a manifest body. `content_type` is the request's `Content-Type`.
pub fn parse(content: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, ManifestError> {
    let header = content_type.map(essence).filter(|h| !h.is_empty());
    if matches!(header, Some(DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED)) {
        return Err(ManifestError::Schema1);
    }
    let raw: RawManifest =
        serde_json::from_slice(content).map_err(|e| ManifestError::Json(e.to_string()))?;
    match raw.schema_version {
        Some(2) => {}
        Some(1) => return Err(ManifestError::Schema1),
        _ => return Err(ManifestError::SchemaVersion),
    }
    let media_type = match (raw.media_type.as_deref(), header) {
        (Some(field), Some(h)) if field != h => {
            return Err(ManifestError::MediaTypeMismatch {
                field: field.to_owned(),
                header: h.to_owned(),
            });
        }
        (Some(field), _) => field.to_owned(),
        (None, Some(h)) => h.to_owned(),
        // OCI lets mediaType be omitted; the shape then tells which kind it is.
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_owned(),
        (None, None) if raw.config.is_some() => OCI_MANIFEST.to_owned(),
        (None, None) => return Err(ManifestError::NoMediaType),
    };
    if matches!(media_type.as_str(), DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED) {
        return Err(ManifestError::Schema1);
    }
    let mut parsed = ParsedManifest {
        media_type,
        blobs: Vec::new(),
        all_blobs: Vec::new(),
        blob_sizes: Vec::new(),
        manifests: Vec::new(),
        children: Vec::new(),
        subject: None,
        artifact_type: raw.artifact_type.clone(),
        annotations: raw.annotations.clone(),
    };
    match parsed.media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw
                .config
                .as_ref()
                .ok_or_else(|| ManifestError::Invalid("image manifest has no config".into()))?;
            let layers = raw
                .layers
                .as_ref()
                .ok_or_else(|| ManifestError::Invalid("image manifest has no layers".into()))?;
            if raw.manifests.is_some() {
                return Err(ManifestError::Invalid(
                    "image manifest must not have manifests".into(),
                ));
            }
            let cd = descriptor_digest(config, "config")?;
            parsed.blob_sizes.push((cd.clone(), config.size as u64));
            parsed.blobs.push(cd.clone());
            parsed.all_blobs.push(cd);
            for (i, l) in layers.iter().enumerate() {
                let d = descriptor_digest(l, &format!("layer {i}"))?;
                // Non-distributable layers live elsewhere by design; they are not required here.
                if l.urls.as_ref().is_none_or(Vec::is_empty) {
                    parsed.blob_sizes.push((d.clone(), l.size as u64));
                    parsed.blobs.push(d.clone());
                }
                parsed.all_blobs.push(d);
            }
            if parsed.artifact_type.is_none() {
                parsed.artifact_type = config.media_type.clone();
            }
        }
        OCI_INDEX | DOCKER_LIST => {
            let children = raw
                .manifests
                .as_ref()
                .ok_or_else(|| ManifestError::Invalid("index has no manifests".into()))?;
            if raw.config.is_some() || raw.layers.is_some() {
                return Err(ManifestError::Invalid(
                    "index must not have config or layers".into(),
                ));
            }
            for (i, m) in children.iter().enumerate() {
                let digest = descriptor_digest(m, &format!("manifest {i}"))?;
                parsed.children.push(Child {
                    digest: digest.clone(),
                    media_type: m.media_type.clone().unwrap_or_default(),
                    size: m.size as u64,
                    platform: m.platform(),
                    attests: platform::attestation_subject(
                        m.annotations.as_ref().and_then(Value::as_object),
                    ),
                });
                parsed.manifests.push(digest);
            }
        }
        other => return Err(ManifestError::UnknownMediaType(other.to_owned())),
    }
    if let Some(s) = &raw.subject {
        parsed.subject = Some(descriptor_digest(s, "subject")?);
    }
    parsed.blobs.sort();
    parsed.blobs.dedup();
    parsed.blob_sizes.sort();
    parsed.blob_sizes.dedup_by(|a, b| a.0 == b.0);
    parsed.manifests.sort();
    parsed.manifests.dedup();
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":3}}]{extra}}}"#,
            d('a'),
            d('b')
        )
    }

    #[test]
    fn image_manifest_references() {
        let m = parse(image("").as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(m.blobs.len(), 2);
        assert!(m.manifests.is_empty());
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn subject_and_artifact_type() {
        let extra = format!(
            r#","artifactType":"application/vnd.example.sig","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":9}}"#,
            d('c')
        );
        let m = parse(image(&extra).as_bytes(), None).unwrap();
        assert_eq!(m.subject.unwrap().to_string(), d('c'));
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.example.sig")
        );
    }

    #[test]
    fn index_children_carry_platforms() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{a}","size":10,"platform":{{"os":"linux","architecture":"arm","variant":"v7"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{b}","size":20,"platform":{{"os":"unknown","architecture":"unknown"}},
                "annotations":{{"vnd.docker.reference.type":"attestation-manifest","vnd.docker.reference.digest":"{a}"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{c}","size":30,"platform":"odd"}}]}}"#,
            a = d('a'),
            b = d('b'),
            c = d('c')
        );
        let m = parse(index.as_bytes(), None).unwrap();
        assert_eq!(m.children.len(), 3);
        assert_eq!(
            m.children[0].platform.as_ref().map(ToString::to_string),
            Some("linux/arm/v7".into())
        );
        assert_eq!(
            m.children[1].attests.as_ref().map(ToString::to_string),
            Some(d('a'))
        );
        assert_eq!(
            (m.children[2].size, m.children[2].platform.clone()),
            (30, None)
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse(br#"{"schemaVersion":1,"name":"x"}"#, None).unwrap_err(),
            ManifestError::Schema1
        );
        assert_eq!(
            parse(b"{}", Some(DOCKER_SCHEMA1_SIGNED)).unwrap_err(),
            ManifestError::Schema1
        );
        assert!(matches!(
            parse(image("").as_bytes(), Some(OCI_INDEX)),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        assert!(matches!(
            parse(br#"{"schemaVersion":2,"mediaType":"text/plain"}"#, None),
            Err(ManifestError::UnknownMediaType(_))
        ));
        assert!(matches!(
            parse(b"{not json", None),
            Err(ManifestError::Json(_))
        ));
        let bad_digest = image("").replace(&d('b'), "sha256:1234");
        assert!(matches!(
            parse(bad_digest.as_bytes(), None),
            Err(ManifestError::Invalid(_))
        ));
    }
}
