//! Repository patterns, as scope maps, `--repository` and mirror rules write them: `*` matches
//! within one path segment, `**` matches any number of whole segments (including none).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("repository pattern is empty")]
    Empty,
    #[error("repository pattern {0:?} has an empty segment")]
    EmptySegment(String),
    #[error("'**' must be a whole segment in repository pattern {0:?}")]
    DoubleStarInSegment(String),
    #[error("repository pattern {0:?} has characters a repository name cannot have")]
    BadCharacter(String),
}

/// A validated repository pattern such as `team-a/**`, `samples/*` or `hello-world`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepositoryPattern {
    text: String,
    segments: Vec<String>,
}

impl RepositoryPattern {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True if `name` (a repository name) matches.
    pub fn matches(&self, name: &str) -> bool {
        let names: Vec<&str> = name.split('/').collect();
        let pats: Vec<&str> = self.segments.iter().map(String::as_str).collect();
        match_segments(&pats, &names)
    }

    /// True if the pattern names exactly one repository (no wildcard).
    pub fn is_exact(&self) -> bool {
        !self.text.contains('*')
    }
}

fn match_segments(pats: &[&str], names: &[&str]) -> bool {
    match pats.split_first() {
        None => names.is_empty(),
        Some((&"**", rest)) => (0..=names.len()).any(|skip| match_segments(rest, &names[skip..])),
        Some((p, rest)) => match names.split_first() {
            Some((n, names_rest)) => {
                glob(p.as_bytes(), n.as_bytes()) && match_segments(rest, names_rest)
            }
            None => false,
        },
    }
}

/// `*` matches any run of characters within one segment.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

impl FromStr for RepositoryPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        let mut segments = Vec::new();
        for seg in s.split('/') {
            if seg.is_empty() {
                return Err(PatternError::EmptySegment(s.to_owned()));
            }
            if seg.contains("**") && seg != "**" {
                return Err(PatternError::DoubleStarInSegment(s.to_owned()));
            }
            let ok = seg.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'-' | b'*')
            });
            if !ok {
                return Err(PatternError::BadCharacter(s.to_owned()));
            }
            segments.push(seg.to_owned());
        }
        Ok(RepositoryPattern {
            text: s.to_owned(),
            segments,
        })
    }
}

impl fmt::Display for RepositoryPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        p.parse::<RepositoryPattern>().unwrap().matches(n)
    }

    #[test]
    fn exact_and_wildcards() {
        assert!(m("hello-world", "hello-world"));
        assert!(!m("hello-world", "hello-world/x"));
        assert!(m("samples/*", "samples/a"));
        assert!(!m("samples/*", "samples/a/b"));
        assert!(!m("samples/*", "samples"));
        assert!(m("team-a/**", "team-a/x"));
        assert!(m("team-a/**", "team-a/x/y/z"));
        assert!(m("team-a/**", "team-a"));
        assert!(!m("team-a/**", "team-b/x"));
        assert!(m("**", "anything/at/all"));
        assert!(m("**/base", "a/b/base"));
        assert!(m("**/base", "base"));
        assert!(m("app-*", "app-web"));
        assert!(!m("app-*", "api-web"));
        assert!(m("a/*/c/**", "a/b/c"));
        assert!(m("*-tmp/**", "x-tmp/y"));
    }

    #[test]
    fn invalid_patterns() {
        assert!("".parse::<RepositoryPattern>().is_err());
        assert!("a//b".parse::<RepositoryPattern>().is_err());
        assert!("a/**b".parse::<RepositoryPattern>().is_err());
        assert!("A/b".parse::<RepositoryPattern>().is_err());
        assert!(
            "a/../b"
                .parse::<RepositoryPattern>()
                .is_ok_and(|p| !p.matches("a/x/b"))
        );
        assert!("team a".parse::<RepositoryPattern>().is_err());
    }
}
