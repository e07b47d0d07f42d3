use super::*;

fn name(s: &str) -> RepositoryName {
    s.parse().unwrap()
}

#[test]
fn paths_split_at_the_last_keyword() {
    assert_eq!(parse_path("").unwrap(), Route::Base);
    assert_eq!(parse_path("_catalog").unwrap(), Route::Catalog);
    assert_eq!(
        parse_path("a/b/c/manifests/latest").unwrap(),
        Route::Manifest(name("a/b/c"), "latest".into())
    );
    // A repository may itself be called "manifests" or "blobs".
    assert_eq!(
        parse_path("x/manifests/manifests/v1").unwrap(),
        Route::Manifest(name("x/manifests"), "v1".into())
    );
    assert_eq!(
        parse_path("x/blobs/blobs/sha256:ab").unwrap(),
        Route::Blob(name("x/blobs"), "sha256:ab".into())
    );
    assert_eq!(
        parse_path("x/blobs/uploads/").unwrap(),
        Route::UploadStart(name("x"))
    );
    assert_eq!(
        parse_path("x/blobs/uploads").unwrap(),
        Route::UploadStart(name("x"))
    );
    assert_eq!(
        parse_path("x/blobs/uploads/abc").unwrap(),
        Route::Upload(name("x"), "abc".into())
    );
    assert_eq!(
        parse_path("x/y/tags/list").unwrap(),
        Route::Tags(name("x/y"))
    );
    assert_eq!(
        parse_path("x/referrers/sha256%3Aab").unwrap(),
        Route::Referrers(name("x"), "sha256:ab".into())
    );
}

#[test]
fn traversal_and_bad_names_are_name_invalid() {
    for p in [
        "../etc/manifests/latest",
        "%2e%2e/manifests/latest",
        "a/%2e%2e/b/blobs/sha256:ab",
        "A/tags/list",
        "a//b/tags/list",
        "/manifests/x",
    ] {
        let e = parse_path(p).unwrap_err();
        assert_eq!(e.code, Code::NameInvalid, "{p}");
    }
    assert_eq!(
        parse_path("a/unknown/x").unwrap_err().code,
        Code::Unsupported
    );
}
