//! Request targets: any path the gateway accepts stays under its upstream's base URL,
//! at the upstream's host and port, has one spelling, and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_gateway::target::{normalize, upstream_uri};

const BASES: [&str; 4] = [
    "http://127.0.0.1:9000",
    "https://api.openai.com/v1",
    "https://x.openai.azure.com/openai",
    "http://h:8080/tenant-a",
];

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    // As hyper would hand it over, when it is a valid URI at all.
    let path = match raw.parse::<http::Uri>() {
        Ok(uri) => uri.path().to_owned(),
        Err(_) => raw.to_owned(),
    };
    let Ok(out) = normalize(&path) else {
        return;
    };
    assert!(out.starts_with('/'), "{out:?}");
    assert!(
        !out.split('/').any(|s| s == "." || s == ".."),
        "{out:?} climbs"
    );
    assert!(!out.contains('\\'), "{out:?}");
    assert_eq!(normalize(&out).as_deref(), Ok(out.as_str()), "one spelling");
    for base in BASES {
        let url = upstream_uri(base, &out);
        let uri: http::Uri = match url.parse() {
            Ok(u) => u,
            Err(e) => panic!("{url:?} is not a URI: {e}"),
        };
        let want: http::Uri = base.parse().expect("base");
        assert_eq!(uri.authority(), want.authority(), "{url:?} left its host");
        let root = want.path().trim_end_matches('/');
        let root = root
            .strip_suffix("/v1")
            .or_else(|| root.strip_suffix("/openai"))
            .unwrap_or(root);
        assert!(uri.path().starts_with(root), "{url:?} left {root:?}");
    }
});
