//! Prometheus text pages read as samples (`name{labels} value` lines), never as text: HELP lines
//! and other series contain the same words and numbers.

use std::collections::BTreeMap;

/// One sample line: its metric name, labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// `name` or `name{k="v",...}` into its name and label set; None if it is not of that form.
fn series(s: &str) -> Option<(String, BTreeMap<String, String>)> {
    let s = s.trim();
    let Some(open) = s.find('{') else {
        return (!s.is_empty() && !s.contains(char::is_whitespace))
            .then(|| (s.to_owned(), BTreeMap::new()));
    };
    let name = &s[..open];
    let body = s[open + 1..].strip_suffix('}')?;
    let mut labels = BTreeMap::new();
    let mut rest = body;
    while !rest.trim_start_matches(',').is_empty() {
        rest = rest.trim_start_matches(',');
        let eq = rest.find("=\"")?;
        let key = rest[..eq].trim().to_owned();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break eq + 2 + i + 1,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key, value);
        rest = &rest[end..];
    }
    Some((name.to_owned(), labels))
}

/// Every sample in a text exposition page (comments and blank lines skipped).
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            // The value follows the series (whose label values may contain spaces), and an
            // optional timestamp may follow the value.
            let close = l.rfind('}').map_or(0, |i| i + 1);
            let mut tail = l[close..].split_whitespace();
            let (series_text, value) = if close == 0 {
                (tail.next()?, tail.next()?)
            } else {
                (&l[..close], tail.next()?)
            };
            let (name, labels) = series(series_text)?;
            Some(Sample {
                name,
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// The value of one series (`name` or `name{k="v",...}`, labels in any order, all of them).
pub fn sample(text: &str, wanted: &str) -> Option<f64> {
    let (name, labels) = series(wanted)?;
    samples(text)
        .into_iter()
        .find(|s| s.name == name && s.labels == labels)
        .map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP outpost_trusted 1 while the node trusts it; outpost_trusted 1\n\
        # TYPE outpost_trusted gauge\n\
        outpost_trusted 0\n\
        outpost_runs_total{result=\"success\",kind=\"a b\"} 3\n\
        outpost_runs_total{result=\"failed\"} 1 1700000000\n\
        outpost_runs_total_created 123.5\n";

    #[test]
    fn reads_samples_not_text() {
        assert_eq!(sample(PAGE, "outpost_trusted"), Some(0.0));
        assert_eq!(
            sample(PAGE, "outpost_runs_total{kind=\"a b\",result=\"success\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(PAGE, "outpost_runs_total{result=\"failed\"}"),
            Some(1.0)
        );
        assert_eq!(sample(PAGE, "outpost_runs_total"), None);
        assert_eq!(sample(PAGE, "outpost_runs_total_created"), Some(123.5));
        assert_eq!(sample(PAGE, "outpost_missing"), None);
    }
}
