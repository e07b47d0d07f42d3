use super::*;

#[test]
fn range_headers() {
    let p = RangeRequest::parse;
    assert_eq!(
        p("bytes=0-9"),
        Some(RangeRequest::From {
            first: 0,
            last: Some(9)
        })
    );
    assert_eq!(
        p("bytes=5-"),
        Some(RangeRequest::From {
            first: 5,
            last: None
        })
    );
    assert_eq!(p("bytes=-3"), Some(RangeRequest::Suffix(3)));
    assert_eq!(p("bytes=9-5"), None);
    assert_eq!(p("bytes=0-1,4-5"), None);
    assert_eq!(p("items=0-1"), None);
    assert_eq!(p("bytes=a-b"), None);
    assert_eq!(p("bytes=-"), None);
}

#[test]
fn ranges_resolve_against_size() {
    let r = |first, last| Some(ByteRange { first, last });
    assert_eq!(
        RangeRequest::From {
            first: 0,
            last: Some(99)
        }
        .resolve(10),
        r(0, 9)
    );
    assert_eq!(
        RangeRequest::From {
            first: 10,
            last: None
        }
        .resolve(10),
        None
    );
    assert_eq!(RangeRequest::Suffix(3).resolve(10), r(7, 9));
    assert_eq!(RangeRequest::Suffix(30).resolve(10), r(0, 9));
    assert_eq!(RangeRequest::Suffix(0).resolve(10), None);
    assert_eq!(
        RangeRequest::From {
            first: 0,
            last: None
        }
        .resolve(0),
        None
    );
}
