//! Paginated listings: `/v2/<name>/tags/list` and `/v2/_catalog`.

use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use outpost_core::RepositoryName;
use serde_json::json;

use super::{ApiError, Code, Shared, query};
use crate::auth::Principal;

/// One page of a sorted list after `last`, at most `n` long, and whether more follow.
fn page(items: Vec<String>, n: Option<usize>, last: Option<&str>) -> (Vec<String>, bool) {
    let start = match last {
        Some(l) => items.partition_point(|i| i.as_str() <= l),
        None => 0,
    };
    let rest = &items[start..];
    match n {
        Some(n) if n < rest.len() => (rest[..n].to_vec(), true),
        _ => (rest.to_vec(), false),
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
    let all = app.store.tags(repo).await?;
    let (tags, more) = page(all, n, last.as_deref());
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
    let all: Vec<String> = app
        .store
        .repositories()
        .await?
        .into_iter()
        .map(|r| r.as_str().to_owned())
        .collect();
    // Only what the caller may read; paging happens over that list, so pages stay full.
    let all = super::access::visible(principal, all);
    let (repos, more) = page(all, n, last.as_deref());
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
    use super::page;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn pages() {
        let all = v(&["a", "b", "c", "d"]);
        assert_eq!(page(all.clone(), Some(2), None), (v(&["a", "b"]), true));
        assert_eq!(
            page(all.clone(), Some(2), Some("b")),
            (v(&["c", "d"]), false)
        );
        assert_eq!(page(all.clone(), Some(0), None), (v(&[]), true));
        assert_eq!(page(all.clone(), None, Some("bb")), (v(&["c", "d"]), false));
        assert_eq!(page(all.clone(), Some(9), Some("z")), (v(&[]), false));
        assert_eq!(page(all, Some(4), None), (v(&["a", "b", "c", "d"]), false));
    }
}
