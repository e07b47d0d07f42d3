use std::io::Write;

use super::*;

const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn auth_with(anonymous: Anonymous, readonly: bool) -> (Arc<Auth>, tempfile::NamedTempFile, String) {
    let password = "correct-horse".to_owned();
    let h = tokens::hash_password(&password).unwrap();
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(
        f,
        r#"
[[scope_map]]
name = "team"
rules = [
  {{ repository = "team/**", actions = ["content/read", "content/write", "metadata/read"] }},
  {{ repository = "shared", actions = ["content/read"] }},
]
[[token]]
name = "ci"
scope_map = "team"
password1 = "{h}"
"#
    )
    .unwrap();
    let auth = Auth::new(AuthOptions {
        tokens_file: Some(f.path().to_owned()),
        anonymous,
        readonly,
        max_failures: 20,
        token_lifetime: Duration::from_secs(300),
        signing_key_file: None,
    })
    .unwrap();
    (Arc::new(auth), f, password)
}

fn need(repo: &str, action: Action) -> Need {
    Need {
        repo: repo.parse().unwrap(),
        action,
    }
}

fn basic(name: &str, pw: &str) -> Credentials {
    Credentials::Basic {
        name: name.into(),
        password: pw.into(),
    }
}

#[tokio::test]
async fn basic_scope_decisions() {
    let (auth, _f, pw) = auth_with(Anonymous::None, false);
    let p = auth.authenticate(IP, basic("ci", &pw)).await.unwrap();
    assert!(
        auth.authorize(&p, &[need("team/app", Action::ContentWrite)])
            .is_ok()
    );
    assert!(
        auth.authorize(&p, &[need("shared", Action::ContentRead)])
            .is_ok()
    );
    assert!(matches!(
        auth.authorize(&p, &[need("shared", Action::MetadataRead)]),
        Err(Denial::Denied(_))
    ));
    assert!(matches!(
        auth.authorize(&p, &[need("other", Action::ContentRead)]),
        Err(Denial::Denied(_))
    ));
    // Second time from the verified cache; a wrong password is still refused.
    assert!(auth.authenticate(IP, basic("ci", &pw)).await.is_ok());
    assert!(auth.authenticate(IP, basic("ci", "nope")).await.is_err());
    assert!(auth.authenticate(IP, basic("ghost", &pw)).await.is_err());
    let anon = auth.authenticate(IP, Credentials::None).await.unwrap();
    assert!(matches!(
        auth.authorize(&anon, &[need("team/app", Action::ContentRead)]),
        Err(Denial::Unauthorized {
            insufficient: false,
            ..
        })
    ));
    assert!(auth.authorize(&anon, &[]).is_err());
}

#[tokio::test]
async fn bearer_tokens_carry_only_what_was_asked_and_allowed() {
    let (auth, _f, pw) = auth_with(Anonymous::None, false);
    let p = auth.authenticate(IP, basic("ci", &pw)).await.unwrap();
    let t = auth
        .issue(
            &p,
            Some(SERVICE),
            &["repository:team/app:pull repository:other:pull".into()],
        )
        .unwrap();
    let b = auth
        .authenticate(IP, Credentials::Bearer(t.token))
        .await
        .unwrap();
    assert!(
        auth.authorize(&b, &[need("team/app", Action::ContentRead)])
            .is_ok()
    );
    assert!(
        auth.authorize(&b, &[need("team/app", Action::MetadataRead)])
            .is_ok()
    );
    // Allowed by the scope map but not asked for: fetch another token.
    assert!(matches!(
        auth.authorize(&b, &[need("team/app", Action::ContentWrite)]),
        Err(Denial::Unauthorized {
            insufficient: true,
            ..
        })
    ));
    assert!(matches!(
        auth.authorize(&b, &[need("other", Action::ContentRead)]),
        Err(Denial::Denied(_))
    ));
    assert!(auth.issue(&p, Some("someone-else"), &[]).is_err());
    assert!(
        auth.authenticate(IP, Credentials::Bearer("x.y.z".into()))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn readonly_refuses_every_write() {
    let (auth, _f, pw) = auth_with(Anonymous::None, true);
    let p = auth.authenticate(IP, basic("ci", &pw)).await.unwrap();
    assert!(matches!(
        auth.authorize(&p, &[need("team/app", Action::ContentWrite)]),
        Err(Denial::Denied(_))
    ));
    assert!(
        auth.authorize(&p, &[need("team/app", Action::ContentRead)])
            .is_ok()
    );
    let t = auth
        .issue(&p, None, &["repository:team/app:pull,push".into()])
        .unwrap();
    let b = auth
        .authenticate(IP, Credentials::Bearer(t.token))
        .await
        .unwrap();
    if let Principal::Bearer { claims, .. } = &b {
        assert_eq!(
            claims.access[0].actions,
            vec!["content/read", "metadata/read"]
        );
    } else {
        panic!("bearer principal");
    }
}

#[tokio::test]
async fn anonymous_pull_only() {
    let (auth, _f, _) = auth_with(Anonymous::Pull, false);
    let anon = auth.authenticate(IP, Credentials::None).await.unwrap();
    assert!(
        auth.authorize(&anon, &[need("any/thing", Action::ContentRead)])
            .is_ok()
    );
    assert!(matches!(
        auth.authorize(&anon, &[need("any/thing", Action::ContentWrite)]),
        Err(Denial::Unauthorized { .. })
    ));
    assert!(auth.authorize_catalog(&anon).is_ok());
}

#[tokio::test]
async fn failures_are_rate_limited_per_address() {
    let (auth, _f, pw) = auth_with(Anonymous::None, false);
    let bad: IpAddr = "192.0.2.1".parse().unwrap();
    for _ in 0..20 {
        let _ = auth
            .authenticate(bad, Credentials::Bearer("forged".into()))
            .await;
    }
    assert!(matches!(
        auth.authenticate(bad, basic("ci", &pw)).await,
        Err(Denial::TooMany(_))
    ));
    assert!(auth.authenticate(IP, basic("ci", &pw)).await.is_ok());
}

#[test]
fn authorization_headers() {
    let p = |s: &str| Credentials::parse(Some(s.as_bytes()));
    assert!(matches!(p("Basic Y2k6cHc="), Ok(Credentials::Basic { .. })));
    assert!(matches!(p("bearer abc"), Ok(Credentials::Bearer(_))));
    for bad in [
        "Basic",
        "Basic !!!",
        "Basic bm9jb2xvbg==",
        "Digest x",
        "Bearer ",
        "x",
    ] {
        assert!(p(bad).is_err(), "{bad}");
    }
    assert!(p(&format!("Bearer {}", "a".repeat(9000))).is_err());
    assert!(matches!(Credentials::parse(None), Ok(Credentials::None)));
}

#[tokio::test]
async fn without_a_tokens_file_credentials_are_ignored() {
    let auth = Arc::new(
        Auth::new(AuthOptions {
            tokens_file: None,
            anonymous: Anonymous::Full,
            readonly: false,
            max_failures: 20,
            token_lifetime: Duration::from_secs(300),
            signing_key_file: None,
        })
        .unwrap(),
    );
    let p = auth
        .authenticate(IP, basic("someone", "anything"))
        .await
        .unwrap();
    assert!(
        auth.authorize(&p, &[need("any/repo", Action::ContentWrite)])
            .is_ok()
    );
}

#[tokio::test]
async fn signing_key_file_reload_rotates_and_removes_keys() {
    let (_, tokens, pw) = auth_with(Anonymous::None, false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    let (a, b) = (keys::generate().unwrap(), keys::generate().unwrap());
    std::fs::write(&path, format!("# key A\n{a}\n")).unwrap();
    let opts = || AuthOptions {
        tokens_file: Some(tokens.path().to_owned()),
        anonymous: Anonymous::None,
        readonly: false,
        max_failures: 1000,
        token_lifetime: Duration::from_secs(300),
        signing_key_file: Some(path.clone()),
    };
    // Two processes with the same file accept each other's tokens.
    let (one, two) = (
        Arc::new(Auth::new(opts()).unwrap()),
        Arc::new(Auth::new(opts()).unwrap()),
    );
    let scope = ["repository:team/app:pull".to_owned()];
    let issue = |auth: Arc<Auth>| {
        let (pw, scope) = (pw.clone(), scope.clone());
        async move {
            let p = auth.authenticate(IP, basic("ci", &pw)).await.unwrap();
            auth.issue(&p, Some(SERVICE), &scope).unwrap().token
        }
    };
    let token_a = issue(one.clone()).await;
    let bearer = |t: &str| Credentials::Bearer(t.to_owned());
    assert!(two.authenticate(IP, bearer(&token_a)).await.is_ok());

    // B added first: new tokens carry B's kid, A's still verify (also from the cache).
    std::fs::write(&path, format!("{b}\n{a}\n")).unwrap();
    assert!(two.reload_signing_keys().unwrap());
    assert!(!two.reload_signing_keys().unwrap(), "unchanged file");
    let token_b = issue(two.clone()).await;
    assert_ne!(token_a.split('.').next(), token_b.split('.').next());
    assert!(two.authenticate(IP, bearer(&token_a)).await.is_ok());
    assert!(two.authenticate(IP, bearer(&token_b)).await.is_ok());
    // `one` has not reloaded: B is unknown to it.
    assert!(one.authenticate(IP, bearer(&token_b)).await.is_err());

    // A broken file keeps the previous keys.
    std::fs::write(&path, "short\n").unwrap();
    assert!(two.reload_signing_keys().is_err());
    assert!(two.authenticate(IP, bearer(&token_a)).await.is_ok());

    // A removed: its token is refused at once, though it was verified (and cached) before.
    std::fs::write(&path, format!("{b}\n")).unwrap();
    assert!(two.reload_signing_keys().unwrap());
    match two.authenticate(IP, bearer(&token_a)).await {
        Err(Denial::Unauthorized { reason, .. }) => assert!(reason.contains("key"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(two.authenticate(IP, bearer(&token_b)).await.is_ok());

    // At start, a broken file is refused with the path and line, never the key.
    std::fs::write(&path, format!("{a}\nQUFBQQ==\n")).unwrap();
    let e = Auth::new(opts()).err().unwrap().to_string();
    assert!(e.contains("line 2") && e.contains("4 bytes"), "{e}");
    assert!(!e.contains(a.trim_end_matches('=')), "{e}");
}
