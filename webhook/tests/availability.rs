//! Availability checks against a small registry stand-in on loopback (plain HTTP): one
//! upstream request however many admissions ask at once, answers reused for the TTL, the
//! reasons given for refusals, and the bearer-token challenge flow with dockerconfigjson
//! credentials.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use outpost_core::ImageReference;
use outpost_webhook::availability::{Checker, Settings};

#[derive(Default)]
struct Counts {
    heads: AtomicUsize,
    tokens: AtomicUsize,
}

/// `present/*` exists; `slow/*` exists after 300 ms; `secret/*` needs a bearer token that
/// `/token` gives for Basic dTpw (u:p).
async fn manifest(
    State(c): State<Arc<Counts>>,
    Path((repo, _reference)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    c.heads.fetch_add(1, Ordering::SeqCst);
    match repo.as_str() {
        "present" => StatusCode::OK.into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            StatusCode::OK.into_response()
        }
        "secret" => {
            if headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                == Some("Bearer tok")
            {
                StatusCode::OK.into_response()
            } else {
                let port = headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                (
                    StatusCode::UNAUTHORIZED,
                    [(
                        header::WWW_AUTHENTICATE,
                        format!("Bearer realm=\"http://{port}/token\",service=\"test\""),
                    )],
                )
                    .into_response()
            }
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn token(State(c): State<Arc<Counts>>, headers: HeaderMap) -> Response {
    c.tokens.fetch_add(1, Ordering::SeqCst);
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some("Basic dTpw")
    {
        (
            [(header::CONTENT_TYPE, "application/json")],
            "{\"token\":\"tok\"}",
        )
            .into_response()
    } else {
        StatusCode::UNAUTHORIZED.into_response()
    }
}

async fn start() -> (String, Arc<Counts>, tokio::task::JoinHandle<()>) {
    let counts = Arc::new(Counts::default());
    let app = Router::new()
        .route("/v2/{repo}/manifests/{reference}", get(manifest))
        .route("/token", get(token))
        .with_state(Arc::clone(&counts));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr.to_string(), counts, task)
}

fn checker(ttl: Duration, auth_file: Option<std::path::PathBuf>) -> Arc<Checker> {
    Checker::new(Settings {
        timeout: Duration::from_secs(5),
        cache_ttl: ttl,
        ca_file: None,
        auth_file,
        plain_http: true,
        mint: None,
    })
    .unwrap()
}

fn image(host: &str, rest: &str) -> ImageReference {
    format!("{host}/{rest}").parse().unwrap()
}

#[tokio::test]
async fn concurrent_checks_share_one_request_and_the_answer_is_cached() {
    let (host, counts, server) = start().await;
    let c = checker(Duration::from_secs(60), None);
    let img = image(&host, "slow:1");
    let checks: Vec<_> = (0..20)
        .map(|_| {
            let c = Arc::clone(&c);
            let img = img.clone();
            tokio::spawn(async move { c.check(&img).await })
        })
        .collect();
    for t in checks {
        assert_eq!(t.await.unwrap(), Ok(()));
    }
    assert_eq!(counts.heads.load(Ordering::SeqCst), 1);
    // Cached: no new request.
    assert_eq!(c.check(&img).await, Ok(()));
    assert_eq!(counts.heads.load(Ordering::SeqCst), 1);
    // Another tag is another image.
    assert_eq!(c.check(&image(&host, "slow:2")).await, Ok(()));
    assert_eq!(counts.heads.load(Ordering::SeqCst), 2);
    server.abort();
}

#[tokio::test]
async fn expired_answers_are_asked_again() {
    let (host, counts, server) = start().await;
    let c = checker(Duration::ZERO, None);
    let img = image(&host, "present:1");
    assert_eq!(c.check(&img).await, Ok(()));
    assert_eq!(c.check(&img).await, Ok(()));
    assert_eq!(counts.heads.load(Ordering::SeqCst), 2);
    server.abort();
}

#[tokio::test]
async fn refusals_say_why() {
    let (host, _counts, server) = start().await;
    let c = checker(Duration::from_secs(60), None);
    let why = c.check(&image(&host, "absent:1")).await.unwrap_err();
    assert!(why.contains("absent:1 is not on Outpost"), "{why}");
    // Without credentials the bearer flow is refused.
    let why = c.check(&image(&host, "secret:1")).await.unwrap_err();
    assert!(why.contains("HTTP 401"), "{why}");
    server.abort();
    // Nobody listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let why = c
        .check(&image(&format!("127.0.0.1:{port}"), "x:1"))
        .await
        .unwrap_err();
    assert!(why.contains("unreachable"), "{why}");
}

#[tokio::test]
async fn bearer_challenge_with_dockerconfigjson_credentials() {
    let (host, counts, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join(".dockerconfigjson");
    std::fs::write(
        &auth,
        format!("{{\"auths\":{{\"{host}\":{{\"auth\":\"dTpw\"}}}}}}"),
    )
    .unwrap();
    let c = checker(Duration::from_secs(60), Some(auth));
    assert_eq!(c.check(&image(&host, "secret:1")).await, Ok(()));
    assert_eq!(counts.tokens.load(Ordering::SeqCst), 1);
    server.abort();
}
