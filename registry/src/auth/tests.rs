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
  {{ repository = "gateway/edge-a", actions = ["message/write"] }},
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

/// A child reports with `message/write` on its own gateway pseudo-repository only, also to a
/// readonly registry (a report changes no content); anonymous pull does not include it.
#[tokio::test]
async fn reporting_needs_message_write_on_the_own_gateway() {
    for readonly in [false, true] {
        let (auth, _f, pw) = auth_with(Anonymous::Pull, readonly);
        let p = auth.authenticate(IP, basic("ci", &pw)).await.unwrap();
        let own = gateway_repository("Edge-A");
        assert_eq!(own, "gateway/edge-a");
        assert!(
            auth.authorize(&p, &[need(&own, Action::MessageWrite)])
                .is_ok()
        );
        assert!(matches!(
            auth.authorize(&p, &[need("gateway/edge-b", Action::MessageWrite)]),
            Err(Denial::Denied(_))
        ));
        // Content actions on team/** do not include it.
        assert!(matches!(
            auth.authorize(&p, &[need("team/gateway", Action::MessageWrite)]),
            Err(Denial::Denied(_))
        ));
        let anon = auth.authenticate(IP, Credentials::None).await.unwrap();
        assert!(
            auth.authorize(&anon, &[need(&own, Action::MessageWrite)])
                .is_err()
        );
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

/// An Auth with the tokens file of `auth_with` (or none) and a signing key file holding `keys`.
fn ns_auth(with_tokens: bool, keys: &[&str]) -> (Arc<Auth>, tempfile::TempDir, std::path::PathBuf) {
    let (_, tokens, _) = auth_with(Anonymous::None, false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    std::fs::write(&path, keys.join("\n")).unwrap();
    let tokens_file = with_tokens.then(|| {
        let p = dir.path().join("tokens.toml");
        std::fs::copy(tokens.path(), &p).unwrap();
        p
    });
    let auth = Auth::new(AuthOptions {
        tokens_file,
        anonymous: Anonymous::None,
        readonly: true,
        max_failures: 1000,
        token_lifetime: Duration::from_secs(300),
        signing_key_file: Some(path.clone()),
    })
    .unwrap();
    (Arc::new(auth), dir, path)
}

fn mint(keys: &[&str], ns: &str, pats: &[&str], iat: u64, exp: u64) -> String {
    let k = outpost_core::SigningKeys::parse(std::path::Path::new("k"), &keys.join("\n")).unwrap();
    let p: Vec<RepositoryPattern> = pats.iter().map(|s| s.parse().unwrap()).collect();
    nscred::mint(&k, ns, &p, iat, exp).unwrap()
}

fn ns_count(auth: &Auth, result: &str, namespace: &str) -> u64 {
    auth.namespaces()
        .authentications
        .get_or_create(&namespace::NsAuthLabels {
            result: [
                "accepted",
                "expired",
                "not_yet_valid",
                "bad_signature",
                "unknown_key",
                "malformed",
                "wrong_username",
            ]
            .into_iter()
            .find(|r| *r == result)
            .unwrap(),
            namespace: namespace.into(),
        })
        .get()
}

#[tokio::test]
async fn namespace_credentials_pull_only_on_their_patterns() {
    let a = keys::generate().unwrap();
    for with_tokens in [true, false] {
        let (auth, _dir, _) = ns_auth(with_tokens, &[&a]);
        let now = bearer::now_secs();
        let cred = mint(&[&a], "team-a", &["team-a/**", "base/*"], now, now + 3600);
        let p = auth.authenticate(IP, basic("team-a", &cred)).await.unwrap();
        assert!(matches!(p, Principal::Namespace(_)));
        for repo in ["team-a/app", "team-a/x/y", "base/alpine"] {
            assert!(
                auth.authorize(&p, &[need(repo, Action::ContentRead)])
                    .is_ok()
            );
            assert!(
                auth.authorize(&p, &[need(repo, Action::MetadataRead)])
                    .is_ok()
            );
            // Pull only, whatever the registry's mode.
            for w in [
                Action::ContentWrite,
                Action::ContentDelete,
                Action::MetadataWrite,
            ] {
                assert!(matches!(
                    auth.authorize(&p, &[need(repo, w)]),
                    Err(Denial::Denied(_))
                ));
            }
        }
        for repo in ["team-b/app", "base/a/b", "team-ab/app"] {
            assert!(matches!(
                auth.authorize(&p, &[need(repo, Action::ContentRead)]),
                Err(Denial::Denied(_))
            ));
        }
        assert!(auth.authorize_catalog(&p).is_ok());
        assert!(p.may_list("team-a/app") && !p.may_list("team-b/app"));

        // Exchanged at the token endpoint: only what the credential allows, at most until
        // the credential expires.
        let t = auth
            .issue(
                &p,
                Some(SERVICE),
                &[
                    "repository:team-a/app:pull,push".into(),
                    "repository:team-b/app:pull".into(),
                ],
            )
            .unwrap();
        assert!(t.expires_in <= 300);
        let b = auth
            .authenticate(IP, Credentials::Bearer(t.token.clone()))
            .await
            .unwrap();
        let Principal::Bearer { claims, .. } = &b else {
            panic!("bearer principal");
        };
        assert_eq!(claims.access.len(), 1);
        assert_eq!(claims.access[0].name, "team-a/app");
        assert_eq!(
            claims.access[0].actions,
            vec!["content/read", "metadata/read"]
        );
        assert!(
            auth.authorize(&b, &[need("team-a/app", Action::ContentRead)])
                .is_ok()
        );
        // Outside the credential: 403, not a request for another token.
        assert!(matches!(
            auth.authorize(&b, &[need("team-b/app", Action::ContentRead)]),
            Err(Denial::Denied(_))
        ));
        // Inside it but not in this token: fetch another (401 insufficient_scope).
        assert!(matches!(
            auth.authorize(&b, &[need("team-a/other", Action::ContentRead)]),
            Err(Denial::Unauthorized {
                insufficient: true,
                ..
            })
        ));
        let short = mint(&[&a], "team-a", &["team-a/**"], now, now + 20);
        let p = auth
            .authenticate(IP, basic("team-a", &short))
            .await
            .unwrap();
        let t = auth
            .issue(&p, None, &["repository:team-a/app:pull".into()])
            .unwrap();
        assert!(t.expires_in <= 20, "{}", t.expires_in);
    }
}

#[tokio::test]
async fn namespace_credential_refusals_are_401_and_counted() {
    let (a, b) = (keys::generate().unwrap(), keys::generate().unwrap());
    let (auth, _dir, path) = ns_auth(true, &[&a]);
    let now = bearer::now_secs();
    let good = mint(&[&a], "team-a", &["team-a/**"], now, now + 3600);
    assert!(auth.authenticate(IP, basic("team-a", &good)).await.is_ok());
    let parts: Vec<&str> = good.split('.').collect();
    let mut sig = parts[3].as_bytes().to_vec();
    sig[0] = if sig[0] == b'A' { b'B' } else { b'A' };
    let flipped = format!(
        "opns1.{}.{}.{}",
        parts[1],
        parts[2],
        String::from_utf8(sig).unwrap()
    );
    // Another credential's payload (scope `**`) under this one's signature.
    let other_payload = mint(&[&a], "team-a", &["**"], now, now + 3600);
    let tampered = format!(
        "opns1.{}.{}.{}",
        parts[1],
        other_payload.split('.').nth(2).unwrap(),
        parts[3]
    );
    let cases = [
        (
            "team-a",
            mint(&[&a], "team-a", &["team-a/**"], now - 7200, now - 1),
            "expired",
        ),
        (
            "team-a",
            mint(&[&a], "team-a", &["team-a/**"], now + 3600, now + 7200),
            "not_yet_valid",
        ),
        (
            "team-a",
            mint(&[&b], "team-a", &["team-a/**"], now, now + 3600),
            "unknown_key",
        ),
        ("team-a", flipped, "bad_signature"),
        ("team-a", tampered, "bad_signature"),
        ("team-a", "opns1.garbage".to_owned(), "malformed"),
        // Another namespace's credential presented under this namespace's name.
        (
            "team-a",
            mint(&[&a], "team-b", &["team-b/**"], now, now + 3600),
            "wrong_username",
        ),
    ];
    for (user, cred, result) in &cases {
        let before = ns_count(&auth, result, user);
        match auth.authenticate(IP, basic(user, cred)).await {
            Err(Denial::Unauthorized { reason, .. }) => {
                assert!(!reason.contains(cred.as_str()), "{reason}");
            }
            other => panic!("{result}: {other:?}"),
        }
        assert_eq!(ns_count(&auth, result, user), before + 1, "{result}");
    }
    assert_eq!(ns_count(&auth, "accepted", "team-a"), 1);
    // A namespace never accepted is counted without its (unsigned) name.
    let before = ns_count(&auth, "unknown_key", "");
    let forged = mint(&[&b], "ghost", &["**"], now, now + 60);
    assert!(
        auth.authenticate(IP, basic("ghost", &forged))
            .await
            .is_err()
    );
    assert_eq!(ns_count(&auth, "unknown_key", ""), before + 1);
    let seen = auth.namespaces().seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].namespace, "team-a");
    assert_eq!(seen[0].repositories, vec!["team-a/**"]);
    assert_eq!(seen[0].expires_at, now + 3600);

    // The key removed from the file: the credential and the bearer tokens issued for it
    // stop working at once.
    let p = auth.authenticate(IP, basic("team-a", &good)).await.unwrap();
    let t = auth
        .issue(&p, None, &["repository:team-a/app:pull".into()])
        .unwrap();
    assert!(
        auth.authenticate(IP, Credentials::Bearer(t.token.clone()))
            .await
            .is_ok()
    );
    std::fs::write(&path, format!("{b}\n")).unwrap();
    assert!(auth.reload_signing_keys().unwrap());
    assert!(auth.authenticate(IP, basic("team-a", &good)).await.is_err());
    assert!(
        auth.authenticate(IP, Credentials::Bearer(t.token))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn namespace_bearer_revoked_with_its_credential_key() {
    // The signing key of bearer tokens (B) stays; the credential's key (A) goes.
    let (a, b) = (keys::generate().unwrap(), keys::generate().unwrap());
    let (auth, _dir, path) = ns_auth(true, &[&b, &a]);
    let now = bearer::now_secs();
    let cred = mint(&[&a], "team-a", &["team-a/**"], now, now + 3600);
    let p = auth.authenticate(IP, basic("team-a", &cred)).await.unwrap();
    let t = auth
        .issue(&p, None, &["repository:team-a/app:pull".into()])
        .unwrap();
    let bearer = || Credentials::Bearer(t.token.clone());
    assert!(auth.authenticate(IP, bearer()).await.is_ok());
    std::fs::write(&path, format!("{b}\n")).unwrap();
    assert!(auth.reload_signing_keys().unwrap());
    match auth.authenticate(IP, bearer()).await {
        Err(Denial::Unauthorized { reason, .. }) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
