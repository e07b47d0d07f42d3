//! Platforms (`OS/ARCH[/VARIANT]`) and the platform filter (`--platform`): which children of an
//! image index a site keeps. The index itself is always stored as the parent sends it (its
//! digest must not change); only the children it names are chosen here.

use std::fmt;
use std::str::FromStr;

use outpost_core::Digest;

/// Annotations docker buildx puts on the attestation manifests it adds to an index (platform
/// `unknown/unknown`): what they are and which image manifest they describe.
const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";
const ATTESTATION: &str = "attestation-manifest";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{input:?} is not a platform: {reason} (expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm/v7)"
)]
pub struct PlatformError {
    input: String,
    reason: &'static str,
}

/// One platform as an index descriptor names it, in lower case with architecture aliases
/// resolved (shown as the index gives it; a missing variant gets its default only to match).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// Architecture names other tools print for the ones OCI uses (as containerd normalises them).
fn normal_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" | "i686" => "386",
        other => other,
    }
}

/// The variant an image without one is built for: arm64 means v8 and arm means v7 unless said
/// otherwise (containerd's defaults), so `linux/arm64/v8` and `linux/arm64` are the same.
fn default_variant(arch: &str) -> Option<&'static str> {
    match arch {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        _ => None,
    }
}

impl Platform {
    /// From the fields of a descriptor's `platform` object (any case).
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            os: os.to_ascii_lowercase(),
            architecture: normal_arch(&architecture.to_ascii_lowercase()).to_owned(),
            variant: variant
                .map(str::to_ascii_lowercase)
                .filter(|v| !v.is_empty()),
        }
    }

    /// The variant, or the one an image without a variant is built for.
    fn effective_variant(&self) -> Option<&str> {
        self.variant
            .as_deref()
            .or_else(|| default_variant(&self.architecture))
    }

    /// `unknown/unknown`: not something a node runs (buildx's attestation manifests).
    pub fn is_unknown(&self) -> bool {
        self.os == "unknown" && self.architecture == "unknown"
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A `--platform` entry: like [`Platform`], but a missing variant means "any variant".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    text: String,
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl FromStr for PlatformSpec {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| PlatformError {
            input: s.to_owned(),
            reason,
        };
        let parts: Vec<&str> = s.trim().split('/').collect();
        if parts.len() < 2 {
            return Err(err("OS and architecture are both needed"));
        }
        if parts.len() > 3 {
            return Err(err("more than three parts"));
        }
        for p in &parts {
            if p.is_empty() {
                return Err(err("an empty part"));
            }
            if !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                return Err(err("only letters, digits, '.', '_' and '-' may appear"));
            }
        }
        let p = Platform::new(parts[0], parts[1], parts.get(2).copied());
        if p.is_unknown() {
            return Err(err("unknown/unknown is not a platform a node runs"));
        }
        let variant = p.variant;
        let text = match &variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        };
        Ok(PlatformSpec {
            text,
            os: p.os,
            architecture: p.architecture,
            variant,
        })
    }
}

impl fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PlatformSpec {
    pub fn matches(&self, p: &Platform) -> bool {
        self.os == p.os
            && self.architecture == p.architecture
            && self
                .variant
                .as_deref()
                .is_none_or(|v| p.effective_variant() == Some(v))
    }
}

/// A child manifest as its index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub platform: Option<Platform>,
    /// For an attestation manifest: the image manifest it describes.
    pub attests: Option<Digest>,
}

impl Child {
    /// The platform as the index names it, for messages (`unknown/unknown` for attestations).
    pub fn platform_text(&self) -> String {
        self.platform
            .as_ref()
            .map_or_else(|| "no platform".to_owned(), ToString::to_string)
    }
}

/// The platforms a site runs (`--platform`); empty keeps every platform.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformFilter {
    specs: Vec<PlatformSpec>,
}

impl PlatformFilter {
    pub fn new(mut specs: Vec<PlatformSpec>) -> Self {
        specs.dedup_by(|a, b| a.text == b.text);
        PlatformFilter { specs }
    }

    pub fn is_all(&self) -> bool {
        self.specs.is_empty()
    }

    /// The listed platforms as given (normalised); empty when every platform is kept.
    pub fn names(&self) -> Vec<String> {
        self.specs.iter().map(ToString::to_string).collect()
    }

    /// Splits an index's children into those to fetch and those left out. Kept: children of a
    /// listed platform; children with no platform at all (nested indexes, artifact indexes: the
    /// filter cannot tell what they are, and dropping content it cannot judge would lose it);
    /// attestation manifests of a kept child. Left out: other platforms, and `unknown/unknown`
    /// children that attest nothing kept.
    pub fn split(&self, children: &[Child]) -> (Vec<Child>, Vec<Child>) {
        if self.is_all() {
            return (children.to_vec(), Vec::new());
        }
        let runs = |c: &Child| match &c.platform {
            None => true,
            Some(p) if p.is_unknown() => false,
            Some(p) => self.specs.iter().any(|s| s.matches(p)),
        };
        let kept_images: Vec<&Digest> = children
            .iter()
            .filter(|c| c.attests.is_none() && runs(c))
            .map(|c| &c.digest)
            .collect();
        let mut kept = Vec::new();
        let mut skipped = Vec::new();
        for c in children {
            let keep = match &c.attests {
                Some(subject) => kept_images.contains(&subject),
                None => runs(c),
            };
            if keep {
                kept.push(c.clone());
            } else {
                skipped.push(c.clone());
            }
        }
        (kept, skipped)
    }
}

/// The attestation subject of a descriptor's annotations, if it is one buildx added.
pub fn attestation_subject(
    annotations: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Option<Digest> {
    let a = annotations?;
    if a.get(REFERENCE_TYPE)?.as_str()? != ATTESTATION {
        return None;
    }
    a.get(REFERENCE_DIGEST)?.as_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PlatformSpec {
        s.parse().unwrap()
    }

    fn d(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    fn child(c: char, platform: Option<(&str, &str, Option<&str>)>) -> Child {
        Child {
            digest: d(c),
            media_type: super::super::manifest::OCI_MANIFEST.into(),
            size: 500,
            platform: platform.map(|(o, a, v)| Platform::new(o, a, v)),
            attests: None,
        }
    }

    #[test]
    fn parses_and_normalises() {
        assert_eq!(spec("linux/amd64").to_string(), "linux/amd64");
        assert_eq!(spec("Linux/X86_64").to_string(), "linux/amd64");
        assert_eq!(spec("linux/arm/v7").to_string(), "linux/arm/v7");
        assert_eq!(spec("linux/aarch64/v8").to_string(), "linux/arm64/v8");
        assert_eq!(spec(" windows/amd64 ").to_string(), "windows/amd64");
        for bad in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "linux//v7",
            "linux/arm/v7/extra",
            "linux/amd 64",
            "linux/amd64,linux/arm64",
            "unknown/unknown",
        ] {
            let e = bad.parse::<PlatformSpec>().unwrap_err().to_string();
            assert!(e.contains("OS/ARCH[/VARIANT]"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn matching_follows_variants_and_their_defaults() {
        let arm64 = Platform::new("linux", "arm64", None);
        let arm64_v8 = Platform::new("linux", "arm64", Some("v8"));
        let armv6 = Platform::new("linux", "arm", Some("v6"));
        let armv7 = Platform::new("linux", "arm", Some("v7"));
        let arm_bare = Platform::new("linux", "arm", None);
        let amd64 = Platform::new("linux", "amd64", None);
        assert!(spec("linux/arm64").matches(&arm64));
        assert!(
            spec("linux/arm64/v8").matches(&arm64),
            "v8 is arm64's default"
        );
        assert!(spec("linux/arm64").matches(&arm64_v8));
        assert!(spec("linux/arm").matches(&armv6) && spec("linux/arm").matches(&armv7));
        assert!(spec("linux/arm/v7").matches(&armv7) && spec("linux/arm/v7").matches(&arm_bare));
        assert!(!spec("linux/arm/v7").matches(&armv6));
        assert!(!spec("linux/amd64").matches(&arm64));
        assert!(!spec("windows/amd64").matches(&amd64));
        assert!(spec("linux/x86_64").matches(&amd64));
        // Shown as the index names it: the default variant only matters for matching.
        assert_eq!(arm64.to_string(), "linux/arm64");
        assert_eq!(armv7.to_string(), "linux/arm/v7");
    }

    #[test]
    fn split_keeps_listed_platforms_and_their_attestations() {
        let amd = child('a', Some(("linux", "amd64", None)));
        let arm = child('b', Some(("linux", "arm64", None)));
        let v7 = child('c', Some(("linux", "arm", Some("v7"))));
        let mut att_amd = child('d', Some(("unknown", "unknown", None)));
        att_amd.attests = Some(d('a'));
        let mut att_arm = child('e', Some(("unknown", "unknown", None)));
        att_arm.attests = Some(d('b'));
        let stray = child('f', Some(("unknown", "unknown", None)));
        let nested = child('0', None);
        let all = vec![amd, arm, v7, att_amd, att_arm, stray, nested];
        let f = PlatformFilter::new(vec![spec("linux/amd64")]);
        let (kept, skipped) = f.split(&all);
        let kept: Vec<Digest> = kept.into_iter().map(|c| c.digest).collect();
        assert_eq!(kept, vec![d('a'), d('d'), d('0')]);
        let skipped: Vec<Digest> = skipped.into_iter().map(|s| s.digest).collect();
        assert_eq!(skipped, vec![d('b'), d('c'), d('e'), d('f')]);

        let f = PlatformFilter::new(vec![spec("linux/arm64"), spec("linux/arm/v7")]);
        let (kept, _) = f.split(&all);
        let kept: Vec<Digest> = kept.into_iter().map(|c| c.digest).collect();
        assert_eq!(kept, vec![d('b'), d('c'), d('e'), d('0')]);

        let (kept, skipped) = PlatformFilter::default().split(&all);
        assert_eq!(kept.len(), all.len());
        assert!(skipped.is_empty());
    }

    #[test]
    fn attestation_annotations() {
        let a: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&format!(
            r#"{{"{REFERENCE_TYPE}":"{ATTESTATION}","{REFERENCE_DIGEST}":"{}"}}"#,
            d('a')
        ))
        .unwrap();
        assert_eq!(attestation_subject(Some(&a)), Some(d('a')));
        let other: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"org.opencontainers.image.ref.name":"v1"}"#).unwrap();
        assert_eq!(attestation_subject(Some(&other)), None);
        assert_eq!(attestation_subject(None), None);
    }
}
