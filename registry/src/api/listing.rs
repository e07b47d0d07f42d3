//! Paginated listings: `/v2/<name>/tags/list` and `/v2/_catalog`.

use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use outpost_core::RepositoryName;
use serde_json::json;

use super::{ApiError, Code, Shared, query};
use crate::auth::Principal;

/// How many repositories the catalog asks the store for at a time when the caller may not
/// read all of them (its page is filled from several of these).
const CATALOG_CHUNK: usize = 100;

/// How many items to ask the store for: one more than the page, to know whether more follow.
fn fetch_limit(n: Option<usize>) -> usize {
    n.map_or(usize::MAX, |n| n.saturating_add(1))
}

/// Cuts what the store gave (up to `fetch_limit(n)` items) to the page, and whether more follow.
fn cut(mut items: Vec<String>, n: Option<usize>) -> (Vec<String>, bool) {
    match n {
        Some(n) if n < items.len() => {
            items.truncate(n);
            (items, true)
        }
        _ => (items, false),
    }
}

fn pagination(uri: &Uri) -> Result<(Option<usize>, Option<String>), ApiError> {
    let q = query(uri);
    let n = match q.get("n") {
        None => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            ApiError::bad_request(
                Code::PaginationNumberInvalid,
                "n must be a non-negative integer",
            )
        })?),
    };
    Ok((n, q.get("last").cloned()))
}

fn respond(body: serde_json::Value, next: Option<String>) -> Response {
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Some(link) = next
        && let Ok(v) = HeaderValue::from_str(&link)
    {
        resp.headers_mut().insert(header::LINK, v);
    }
    resp
}

fn encode_query_value(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn tags(app: &Shared, repo: &RepositoryName, uri: &Uri) -> Result<Response, ApiError> {
    let (n, last) = pagination(uri)?;
    // The store reads from `last` on, so a page costs its size, not the repository's.
    let fetched = app
        .store
        .tags_page(repo, last.as_deref(), fetch_limit(n))
        .await?;
    let (tags, more) = cut(fetched, n);
    let next = match (more, tags.last(), n) {
        (true, Some(l), Some(n)) => Some(format!(
            "</v2/{repo}/tags/list?n={n}&last={}>; rel=\"next\"",
            encode_query_value(l)
        )),
        _ => None,
    };
    Ok(respond(
        json!({ "name": repo.as_str(), "tags": tags }),
        next,
    ))
}

pub async fn catalog(app: &Shared, uri: &Uri, principal: &Principal) -> Result<Response, ApiError> {
    let (n, last) = pagination(uri)?;
    let want = fetch_limit(n);
    // Only what the caller may read, and pages stay full: the store is read from `last` on
    // in chunks until the page is filled (one chunk when the caller may read everything).
    let mut visible = Vec::new();
    let mut cursor = last;
    loop {
        let chunk = want.saturating_sub(visible.len()).max(CATALOG_CHUNK);
        let got = app
            .store
            .repositories_page(cursor.as_deref(), chunk)
            .await?;
        let exhausted = got.len() < chunk;
        // Ends: every round moves the cursor past what it read, or the store is exhausted.
        match got.last() {
            Some(l) => cursor = Some(l.as_str().to_owned()),
            None => break,
        }
        let names = got.into_iter().map(|r| r.as_str().to_owned()).collect();
        visible.extend(super::access::visible(principal, names));
        if exhausted || visible.len() >= want {
            break;
        }
    }
    visible.truncate(want);
    let (repos, more) = cut(visible, n);
    let next = match (more, repos.last(), n) {
        (true, Some(l), Some(n)) => Some(format!(
            "</v2/_catalog?n={n}&last={}>; rel=\"next\"",
            encode_query_value(l)
        )),
        _ => None,
    };
    Ok(respond(json!({ "repositories": repos }), next))
}

#[cfg(test)]
mod tests {
    use super::{cut, fetch_limit};

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn pages() {
        assert_eq!(fetch_limit(Some(2)), 3);
        assert_eq!(fetch_limit(Some(usize::MAX)), usize::MAX);
        assert_eq!(fetch_limit(None), usize::MAX);
        assert_eq!(cut(v(&["a", "b", "c"]), Some(2)), (v(&["a", "b"]), true));
        assert_eq!(cut(v(&["c", "d"]), Some(2)), (v(&["c", "d"]), false));
        assert_eq!(cut(v(&["a"]), Some(0)), (v(&[]), true));
        assert_eq!(cut(v(&[]), Some(0)), (v(&[]), false));
        assert_eq!(cut(v(&["c", "d"]), None), (v(&["c", "d"]), false));
    }
}
