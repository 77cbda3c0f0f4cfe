//! Request targets, read once: the path a caller's request names, in one spelling,
//! and the URL it goes to at an upstream.
//!
//! Everything the gateway decides by path (the route, its estimate, the allow-list) and
//! the URL it forwards to come from [`normalize`]; nothing else reads a raw request
//! target. This module must never accept a target that could leave the upstream's base
//! URL or reach another host or port, and never panic on any input (a fuzz target,
//! `fuzz/fuzz_targets/request_target.rs`, holds it to both).
//!
//! ```
//! use tollgate_gateway::target::{normalize, upstream_uri};
//!
//! let path = normalize("/v1/chat/completion%73").unwrap();
//! assert_eq!(path, "/v1/chat/completions");
//! assert_eq!(upstream_uri("https://api.openai.com/v1", &path), "https://api.openai.com/v1/chat/completions");
//! assert!(normalize("*").is_err());
//! assert!(normalize("/v1/../admin").is_err());
//! ```

/// Why a request target is refused: the answer is a 400 saying so.
///
/// ```
/// let e = tollgate_gateway::target::normalize("*").unwrap_err();
/// assert_eq!(e.code(), "invalid_request_target");
/// assert!(e.to_string().contains("absolute path"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not an absolute path: `*` (`OPTIONS *`), an authority, an empty target.
    #[error("The request target must be an absolute path such as /v1/chat/completions.")]
    NotAPath,
    /// A path that could be read two ways or leave the upstream's base path.
    #[error("This gateway does not accept {0}.")]
    Refused(&'static str),
}

impl TargetError {
    /// The `code` of the error answer.
    ///
    /// ```
    /// let e = tollgate_gateway::target::normalize("/a/%2e%2e/b").unwrap_err();
    /// assert_eq!(e.code(), "invalid_path");
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            TargetError::NotAPath => "invalid_request_target",
            TargetError::Refused(_) => "invalid_path",
        }
    }
}

/// The path of a request target as the gateway classifies and forwards it; see
/// [`TargetError`] for what is refused.
///
/// # Errors
///
/// [`TargetError::NotAPath`] for a target that does not start with `/`;
/// [`TargetError::Refused`] for a `.` or `..` segment, an encoded `/` or `\\`, a raw `\\`,
/// a `%` not followed by two hex digits.
///
/// ```
/// use tollgate_gateway::target::normalize;
/// assert_eq!(normalize("/v1/%65mbeddings").unwrap(), "/v1/embeddings");
/// assert!(normalize("/v1/a%2Fb").is_err());
/// ```
pub fn normalize(path: &str) -> Result<String, TargetError> {
    // `*` and anything else that is not a path would be joined to the upstream's URL as
    // its port or host.
    if !path.starts_with('/') {
        return Err(TargetError::NotAPath);
    }
    normalize_path(path).map_err(TargetError::Refused)
}

/// The request path as it is classified and forwarded, one spelling for one route:
/// escapes of unreserved characters decoded (RFC 3986 §6.2.2.2; `/v1/chat/completion%73`
/// is the chat route, and is estimated and limited as one), other escapes kept, any
/// byte that is not a path character of RFC 3986 escaped (a space, a control, `?`, `#`,
/// non-ASCII: the path stays one path wherever it is joined). A path
/// that could leave the upstream's base path or be read two ways is refused: a `.` or
/// `..` segment, an encoded `/` or `\`, a raw `\`, a `%` not followed by two hex digits.
/// (Tested in `tests::paths_have_one_spelling_and_cannot_climb`.)
fn normalize_path(raw: &str) -> Result<String, &'static str> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            return Err("a `\\` in the path");
        }
        if b != b'%' {
            // A path character of RFC 3986 (`pchar` and `/`) as it is; anything else
            // (non-ASCII, controls, spaces, `?`, `#`, ...) escaped, so the path stays
            // one path wherever it is joined.
            if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
            i += 1;
            continue;
        }
        let hex = |c: u8| char::from(c).to_digit(16);
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err("a `%` not followed by two hex digits in the path");
        };
        let c = u8::try_from(hi * 16 + lo).unwrap_or(0);
        match c {
            b'/' | b'\\' => return Err("an encoded `/` or `\\` in the path"),
            c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                out.push(char::from(c));
            }
            c => out.push_str(&format!("%{c:02X}")),
        }
        i += 3;
    }
    if out.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("a `.` or `..` segment in the path");
    }
    Ok(out)
}

/// The URI of a request at an upstream: the upstream's prefix (its URL without a
/// trailing `/`) and the request's path and query, less the API root both spell. A base
/// written as SDKs write it (`https://api.openai.com/v1`, `https://x.openai.azure.com/openai`,
/// `https://openrouter.ai/api/v1`) and a request for `/v1/chat/completions` (or
/// `/openai/deployments/...`) make one `/v1`, not two. Only API roots (`v1`, `openai`) are
/// merged; any other base path is kept whole in front of the request's.
///
/// ```
/// use tollgate_gateway::target::upstream_uri;
/// assert_eq!(upstream_uri("http://h:8080", "/v1/models"), "http://h:8080/v1/models");
/// assert_eq!(upstream_uri("https://x.openai.azure.com/openai", "/openai/deployments/d/chat/completions"),
///            "https://x.openai.azure.com/openai/deployments/d/chat/completions");
/// ```
pub fn upstream_uri(prefix: &str, path_and_query: &str) -> String {
    const ROOTS: [&str; 2] = ["v1", "openai"];
    let path_at = prefix
        .find("://")
        .and_then(|i| prefix[i + 3..].find('/').map(|j| i + 3 + j))
        .unwrap_or(prefix.len());
    // The common case, a base without an API root at its end: nothing to merge, and
    // nothing collected on the request path.
    let last = prefix[path_at..].rsplit('/').next().unwrap_or("");
    if !ROOTS.contains(&last) {
        return format!("{prefix}{path_and_query}");
    }
    let base: Vec<&str> = prefix[path_at..].split('/').skip(1).collect();
    let path = path_and_query.split('?').next().unwrap_or("");
    let wanted: Vec<&str> = path.split('/').skip(1).collect();
    // The most segments the base ends with and the path begins with, all API roots (the
    // path's last segment is a resource, never a root).
    let most = base.len().min(wanted.len().saturating_sub(1));
    for k in (1..=most).rev() {
        let tail = &base[base.len() - k..];
        if tail == &wanted[..k] && tail.iter().all(|s| ROOTS.contains(s)) {
            let cut: usize = tail.iter().map(|s| s.len() + 1).sum();
            return format!("{}{path_and_query}", &prefix[..prefix.len() - cut]);
        }
    }
    format!("{prefix}{path_and_query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_and_a_path_share_their_api_root_once() {
        let cases = [
            (
                "https://api.openai.com/v1",
                "/v1/chat/completions",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "https://api.openai.com",
                "/v1/chat/completions",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "https://openrouter.ai/api/v1",
                "/v1/chat/completions?x=1",
                "https://openrouter.ai/api/v1/chat/completions?x=1",
            ),
            (
                "https://x.openai.azure.com/openai",
                "/openai/deployments/d/chat/completions?api-version=1",
                "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=1",
            ),
            (
                "https://x.openai.azure.com/openai/v1",
                "/openai/v1/chat/completions",
                "https://x.openai.azure.com/openai/v1/chat/completions",
            ),
            (
                "https://api.anthropic.com/v1",
                "/v1/messages",
                "https://api.anthropic.com/v1/messages",
            ),
            // Not an API root: kept.
            (
                "http://h/tenant-a",
                "/tenant-a/v1/files",
                "http://h/tenant-a/tenant-a/v1/files",
            ),
            // The last segment is a resource, never merged.
            ("http://h/v1", "/v1", "http://h/v1/v1"),
            ("http://h:8080", "/v1/models", "http://h:8080/v1/models"),
        ];
        for (prefix, path, want) in cases {
            assert_eq!(upstream_uri(prefix, path), want, "{prefix} + {path}");
        }
    }

    #[test]
    fn paths_have_one_spelling_and_cannot_climb() {
        let ok = |p: &str| normalize_path(p).expect(p);
        assert_eq!(ok("/v1/chat/completion%73"), "/v1/chat/completions");
        assert_eq!(ok("/v1/%65mbeddings"), "/v1/embeddings");
        assert_eq!(ok("/v1/files/a%20b%3f"), "/v1/files/a%20b%3F");
        assert_eq!(ok("/v1/models/gpt-4o.x_y~z"), "/v1/models/gpt-4o.x_y~z");
        // What would end the path, or is no URI character, is escaped.
        assert_eq!(ok("/v1/files/a b?c#d\u{7}"), "/v1/files/a%20b%3Fc%23d%07");
        for bad in [
            "/%2e%2e/admin",
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2E",
            "/v1/a%2Fb",
            "/v1/a%5cb",
            "/v1/a\\b",
            "/v1/a%2",
            "/v1/a%zz",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad} is refused");
        }
    }
}
