//! The HTTP side of authentication: what each route needs, the 401/403/429 responses with
//! their challenge, and the bearer-token endpoint (`/oauth2/token`) the challenge names.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, Code, Route, RouteLabel, Shared, percent_decode_form, set_header};
use crate::auth::{Action, Credentials, Denial, Need, Principal, SERVICE};

/// Path of our token endpoint.
pub const TOKEN_PATH: &str = "/oauth2/token";
/// Largest token request body read (a form with a few scopes).
const MAX_TOKEN_FORM: usize = 64 * 1024;

/// What a request on `route` with `method` needs. The catalog is decided separately.
pub fn needs(route: &Route, method: &Method) -> Vec<Need> {
    let (repo, action) = match (route, method) {
        (Route::Base | Route::Catalog, _) => return Vec::new(),
        (Route::Manifest(r, _) | Route::Blob(r, _), &Method::GET | &Method::HEAD) => {
            (r, Action::ContentRead)
        }
        (Route::Manifest(r, _), &Method::PUT) => (r, Action::ContentWrite),
        (Route::Manifest(r, _) | Route::Blob(r, _), &Method::DELETE) => (r, Action::ContentDelete),
        (Route::UploadStart(r) | Route::Upload(r, _), _) => (r, Action::ContentWrite),
        (Route::Tags(r) | Route::Referrers(r, _), _) => (r, Action::MetadataRead),
        // Methods the route does not support: the dispatcher answers 405 after auth.
        (Route::Manifest(r, _) | Route::Blob(r, _), _) => (r, Action::ContentWrite),
    };
    vec![Need {
        repo: repo.clone(),
        action,
    }]
}

/// The client's address, from the connection.
pub fn client_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
}

/// The absolute URL of our token endpoint as the client reached us.
fn realm(app: &Shared, headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        // Only host[:port] characters: the value is quoted into a header.
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let scheme = if app.tls { "https" } else { "http" };
    format!("{scheme}://{host}{TOKEN_PATH}")
}

/// The response for a refused request.
pub fn denial_response(
    app: &Shared,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    denial: Denial,
) -> Response {
    match denial {
        Denial::Unauthorized {
            reason,
            scopes,
            insufficient,
        } => {
            let mut challenge = format!(
                "Bearer realm=\"{}\",service=\"{SERVICE}\"",
                realm(app, headers, uri)
            );
            if !scopes.is_empty() {
                challenge.push_str(&format!(",scope=\"{}\"", scopes.join(" ")));
            }
            if insufficient {
                challenge.push_str(",error=\"insufficient_scope\"");
            }
            let detail: Vec<_> = scopes
                .iter()
                .filter_map(|s| {
                    let mut p = s.splitn(3, ':');
                    Some(json!({"Type": p.next()?, "Name": p.next()?, "Action": p.next()?}))
                })
                .collect();
            let mut e = ApiError::new(StatusCode::UNAUTHORIZED, Code::Unauthorized, reason)
                .header(header::WWW_AUTHENTICATE, challenge);
            if !detail.is_empty() {
                e = e.detail(json!(detail));
            }
            e.into_response()
        }
        Denial::Denied(msg) => {
            ApiError::new(StatusCode::FORBIDDEN, Code::Denied, msg).into_response()
        }
        Denial::TooMany(retry) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::TooManyRequests,
            "too many failed authentication attempts from this address; try again later",
        )
        .header(header::RETRY_AFTER, retry.as_secs().max(1).to_string())
        .into_response(),
    }
}

/// Authenticates and authorises a registry request; returns the principal for handlers that
/// filter by it (catalog, mount).
pub async fn check(
    app: &Shared,
    ip: IpAddr,
    route: &Route,
    method: &Method,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> Result<Principal, Response> {
    let deny = |d| denial_response(app, headers, uri, d);
    let creds = Credentials::parse(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
        .map_err(deny)?;
    let principal = app.auth.authenticate(ip, creds).await.map_err(deny)?;
    let decision = match route {
        Route::Catalog => app.auth.authorize_catalog(&principal),
        _ => app.auth.authorize(&principal, &needs(route, method)),
    };
    match decision {
        Err(Denial::Denied(_))
            if matches!(*method, Method::GET | Method::HEAD) && is_mirror_request(uri) =>
        {
            // containerd tries the next host (the upstream, where the pod's own pull
            // secrets apply) on a 404, but gives up on a 403.
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                Code::NameUnknown,
                "repository name not known to registry",
            )
            .into_response())
        }
        Err(d) => Err(deny(d)),
        Ok(()) => Ok(principal),
    }
}

/// Whether containerd sent the request as a mirror of another registry: it adds
/// `ns=<upstream host>` to the query of requests through a hosts.toml mirror.
pub fn is_mirror_request(uri: &axum::http::Uri) -> bool {
    form_pairs(uri.query().unwrap_or(""))
        .iter()
        .any(|(k, v)| k == "ns" && !v.is_empty())
}

/// Splits an `application/x-www-form-urlencoded` string into pairs, keeping repeats (a
/// token request may name several `scope`s).
fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode_form(k)?, percent_decode_form(v)?))
        })
        .collect()
}

pub(super) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// RFC 3339 UTC time for a Unix timestamp.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `GET` (Basic or anonymous) and `POST` (OAuth2 password grant) `/oauth2/token`.
pub async fn token_endpoint(State(app): State<Shared>, req: Request) -> Response {
    let mut resp = token_response(&app, req).await;
    resp.extensions_mut().insert(RouteLabel("token"));
    resp
}

async fn token_response(app: &Shared, req: Request) -> Response {
    let ip = client_ip(&req);
    let (parts, body) = req.into_parts();
    let deny = |d| denial_response(app, &parts.headers, &parts.uri, d);
    let mut pairs = form_pairs(parts.uri.query().unwrap_or(""));
    let mut creds = match Credentials::parse(
        parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
        Ok(Credentials::Bearer(_)) => {
            return deny(Denial::Unauthorized {
                reason: "the token endpoint takes a username and password, not a bearer token"
                    .into(),
                scopes: Vec::new(),
                insufficient: false,
            });
        }
        Ok(c) => c,
        Err(d) => return deny(d),
    };
    let oauth = parts.method == Method::POST;
    if oauth {
        let bytes = match axum::body::to_bytes(body, MAX_TOKEN_FORM).await {
            Ok(b) => b,
            Err(_) => {
                return ApiError::bad_request(
                    Code::Unsupported,
                    "token request body too large or unreadable",
                )
                .into_response();
            }
        };
        let form = form_pairs(&String::from_utf8_lossy(&bytes));
        let get = |k: &str| {
            form.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        match get("grant_type").as_deref() {
            Some("password") => {
                creds = Credentials::Basic {
                    name: get("username").unwrap_or_default(),
                    password: get("password").unwrap_or_default(),
                };
            }
            _ => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "unsupported_grant_type"}),
                );
            }
        }
        pairs.extend(form);
    } else if parts.method != Method::GET {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            "use GET or POST",
        )
        .into_response();
    }
    let principal = match app.auth.authenticate(ip, creds).await {
        Ok(p) => p,
        Err(d) => return deny(d),
    };
    let service = pairs
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.as_str());
    let scopes: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    let issued = match app.auth.issue(&principal, service, &scopes) {
        Ok(t) => t,
        Err(d) => return deny(d),
    };
    let mut body = json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": rfc3339(issued.issued_at),
    });
    if oauth {
        body["scope"] = json!(scopes.join(" "));
    }
    let mut resp = json_response(StatusCode::OK, &body);
    // Tokens must not be cached by anything in between.
    set_header(resp.headers_mut(), "cache-control", "no-store".into());
    resp
}

/// Every repository in `repos` the principal may read metadata of.
pub fn visible(principal: &Principal, repos: Vec<String>) -> Vec<String> {
    repos
        .into_iter()
        .filter(|r| principal.may_list(r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn mirror_requests() {
        let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
        assert!(is_mirror_request(&uri("/v2/a/manifests/b?ns=docker.io")));
        assert!(is_mirror_request(&uri(
            "/v2/a/blobs/sha256:00?x=1&ns=ghcr.io"
        )));
        assert!(!is_mirror_request(&uri("/v2/a/manifests/b")));
        assert!(!is_mirror_request(&uri("/v2/a/manifests/b?ns=")));
        assert!(!is_mirror_request(&uri("/v2/a/manifests/b?nsx=docker.io")));
    }

    #[test]
    fn forms_keep_repeated_keys() {
        let p =
            form_pairs("scope=repository%3Aa%3Apull&scope=registry:catalog:*&service=outpost&x");
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].1, "repository:a:pull");
        assert_eq!(p[1].1, crate::auth::CATALOG_SCOPE);
        assert_eq!(p[3], ("x".into(), String::new()));
        assert_eq!(form_pairs("a=b+c")[0].1, "b c");
    }
}
