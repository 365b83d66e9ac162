//! Route patterns: `"METHOD /path/glob"` → does a call draw on a bucket.
//!
//! The path part is matched with `glob-match` (no regex compilation, no
//! allocation per match): `*` matches within one path segment, `**` any
//! number of whole segments. The method is an exact, case-insensitive HTTP
//! method or `*` for any.

use crate::error::clip;
use std::fmt;

/// One parsed route pattern, e.g. `POST /api/v2/analytics/**/query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Upper-case method, or `None` for any.
    method: Option<String>,
    /// Path glob, starting with `/`.
    glob: String,
}

/// Why a route pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not of the form `METHOD /path`.
    #[error("expected \"METHOD /path/glob\", e.g. \"POST /api/v2/analytics/**/query\"")]
    Shape,
    /// Method is not a token of letters.
    #[error("method {0} is not an HTTP method or \"*\"")]
    Method(String),
    /// Path does not start with `/`.
    #[error("path {0} must start with '/'")]
    Path(String),
    /// `**` that is not a whole path segment.
    #[error(
        "path {0}: \"**\" must be a whole path segment (\"/a/**/b\"); within a segment, \
         \"*\" matches any characters"
    )]
    Glob(String),
}

impl Route {
    /// Parses `"METHOD /path/glob"`.
    pub fn parse(s: &str) -> Result<Route, RouteError> {
        let mut parts = s.split_whitespace();
        let (Some(method), Some(glob), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(RouteError::Shape);
        };
        let method = match method {
            "*" => None,
            // Letters: an HTTP method, or a name of the caller's own for a
            // slot that is no HTTP call (`JOB` for an ingestion job).
            m if m.chars().all(|c| c.is_ascii_alphabetic()) => Some(m.to_ascii_uppercase()),
            m => return Err(RouteError::Method(clip(m))),
        };
        if !glob.starts_with('/') {
            return Err(RouteError::Path(clip(glob)));
        }
        if glob.split('/').any(|seg| seg.contains("**") && seg != "**") {
            return Err(RouteError::Glob(clip(glob)));
        }
        Ok(Route {
            method,
            glob: glob.to_owned(),
        })
    }

    /// Whether a call with `method` (upper case) to `path` (no query string)
    /// matches this pattern.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && glob_match::glob_match(&self.glob, path)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method.as_deref().unwrap_or("*"), self.glob)
    }
}

/// Why a path cannot be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    /// A percent-escape decodes to bytes that are not UTF-8.
    #[error("its percent-escapes do not decode to UTF-8")]
    NotUtf8,
    /// A control character (decoded or not) in the path.
    #[error("it holds a control character")]
    Control,
}

/// The one form a path is matched in, for Acquire and Report alike, so that
/// spellings an upstream treats as the same resource draw on the same
/// buckets: percent-escapes decoded (`%71uery` is `query`; `%2F` is a `/`,
/// which can only make more buckets match, never fewer), empty segments
/// dropped (`//` from a sloppy URL join, and a trailing `/`), and dot
/// segments resolved (`/a/./b/../c` is `/a/c`; `..` never climbs above the
/// root). Case is kept: paths are case-sensitive.
pub(crate) fn normalize_path(path: &str) -> Result<String, PathError> {
    if is_normal(path) {
        return Ok(path.to_owned());
    }
    normalize_any(path)
}

/// [`normalize_path`] without the shortcut for paths already normal.
fn normalize_any(path: &str) -> Result<String, PathError> {
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| PathError::NotUtf8)?;
    if decoded.chars().any(char::is_control) {
        return Err(PathError::Control);
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        // A `%` that decoding left (from `%25`) stays escaped, so the normal
        // form decodes to itself: it is matched once, as the upstream
        // decodes once.
        for (k, part) in s.split('%').enumerate() {
            if k > 0 {
                out.push_str("%25");
            }
            out.push_str(part);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Whether `path` is already in normal form (the common case, skipped
/// cheaply): plain ASCII without `%` or control characters, and no empty,
/// `.` or `..` segment (so no `//` and no trailing `/`).
fn is_normal(path: &str) -> bool {
    path.len() > 1
        && path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii() && b != b'%' && !b.is_ascii_control())
        && path[1..].split('/').all(|s| !matches!(s, "" | "." | ".."))
}

/// Remembers which buckets a (method, path) matched, so a busy route is
/// glob-matched once, not on every request. Bounded: when it holds
/// [`RouteCache::CAPACITY`] (method, path) pairs it starts over (paths with
/// ids in them, or a caller inventing methods, would otherwise grow it
/// without end). Hand-written because it is a
/// two-level map looked up by `&str` without allocating; a general LRU crate
/// would need an owned key per lookup.
#[derive(Debug, Default)]
pub(crate) struct RouteCache {
    /// path → [(method, matching bucket indices)].
    paths: std::collections::HashMap<Box<str>, Vec<MethodMatch>>,
    /// (method, path) pairs held, over all paths.
    entries: usize,
}

/// A method and the bucket indices it matched on one path.
type MethodMatch = (Box<str>, Box<[usize]>);

impl RouteCache {
    /// Most (method, path) pairs remembered.
    pub(crate) const CAPACITY: usize = 4096;

    /// The bucket indices `method` + `path` match, computing them with
    /// `compute` on a miss.
    pub(crate) fn matches(
        &mut self,
        method: &str,
        path: &str,
        compute: impl FnOnce() -> Vec<usize>,
    ) -> &[usize] {
        let hit = self
            .paths
            .get(path)
            .and_then(|ms| ms.iter().position(|(m, _)| &**m == method));
        if hit.is_none() {
            if self.entries >= Self::CAPACITY {
                self.paths.clear();
                self.entries = 0;
            }
            self.entries += 1;
            self.paths
                .entry(path.into())
                .or_default()
                .push((method.into(), compute().into_boxed_slice()));
        }
        let ms = &self.paths[path];
        let at = hit.unwrap_or(ms.len() - 1);
        &ms[at].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_before_matching() {
        let query = Route::parse("POST /api/v2/analytics/**/query").unwrap();
        for spelled in [
            "/api/v2/analytics/conversations/details/query",
            "/api/v2//analytics/conversations/details/query",
            "//api/v2/analytics/conversations/details/query",
            "/api/v2/./analytics/conversations/x/../details/query",
            "/api/v2/analytics/conversations/details/%71uery",
            "/api%2Fv2/analytics/conversations/details/query",
            "/../api/v2/analytics/conversations/details/query",
            "/api/v2/analytics/conversations/details/query/",
        ] {
            let path = normalize_path(spelled).unwrap();
            assert_eq!(path, "/api/v2/analytics/conversations/details/query");
            assert!(query.matches("POST", &path), "{spelled} skipped the bucket");
        }
        assert_eq!(normalize_path("/").unwrap(), "/");
        assert_eq!(normalize_path("/a/b/").unwrap(), "/a/b");
        assert_eq!(normalize_path("/a/..").unwrap(), "/");
        assert_eq!(normalize_path("/%2571uery").unwrap(), "/%2571uery");
        assert_eq!(normalize_path("/%ff"), Err(PathError::NotUtf8));
        assert_eq!(normalize_path("/a%0Ab"), Err(PathError::Control));
    }

    proptest::proptest! {
        /// Normalising is idempotent, and what comes out has no empty or dot
        /// segments, so no spelling of a path matches fewer routes than its
        /// normal form.
        #[test]
        fn normalising_is_idempotent_and_leaves_no_tricks(
            path in "(/|//|/\\.|/\\.\\.|/[a-z%0-9]{1,6}){0,10}/?"
        ) {
            if let Ok(n) = normalize_path(&path) {
                proptest::prop_assert_eq!(normalize_path(&n), Ok(n.clone()));
                proptest::prop_assert!(n.starts_with('/'));
                proptest::prop_assert!(!n.contains("//"), "{}", n);
                for segment in n.split('/') {
                    proptest::prop_assert!(segment != "." && segment != "..", "{}", n);
                }
            }
        }

        /// The shortcut for paths already normal agrees with the full
        /// normalisation.
        #[test]
        fn the_shortcut_agrees_with_normalising(
            path in "(/|//|/\\.|/\\.\\.|/[a-zA-Z%0-9._~-]{1,6}){0,10}/?"
        ) {
            if is_normal(&path) {
                proptest::prop_assert_eq!(normalize_any(&path), Ok(path.clone()));
            }
        }

        /// Whatever bytes arrive, normalising never panics.
        #[test]
        fn normalising_never_panics(path in proptest::prelude::any::<String>()) {
            let _ = normalize_path(&path);
        }
    }

    #[test]
    fn a_pattern_matches_method_and_path() {
        let query = Route::parse("POST /api/v2/analytics/**/query").unwrap();
        assert!(query.matches("POST", "/api/v2/analytics/conversations/details/query"));
        assert!(!query.matches("GET", "/api/v2/analytics/conversations/details/query"));
    }

    fn m(pattern: &str, method: &str, path: &str) -> bool {
        Route::parse(pattern).unwrap().matches(method, path)
    }

    #[test]
    fn globs_follow_path_segments() {
        let q = "POST /api/v2/analytics/**/query";
        assert!(m(
            q,
            "POST",
            "/api/v2/analytics/conversations/details/query"
        ));
        assert!(m(q, "POST", "/api/v2/analytics/queues/observations/query"));
        assert!(!m(
            q,
            "GET",
            "/api/v2/analytics/conversations/details/query"
        ));
        assert!(!m(
            q,
            "POST",
            "/api/v2/analytics/conversations/details/jobs"
        ));
        assert!(m("* /**", "DELETE", "/api/v2/users/me"));
        assert!(m("get /api/v2/users/*", "GET", "/api/v2/users/abc"));
        assert!(!m("GET /api/v2/users/*", "GET", "/api/v2/users/abc/queues"));
    }

    #[test]
    fn bad_patterns_are_explained() {
        assert_eq!(Route::parse("/api"), Err(RouteError::Shape));
        assert_eq!(
            Route::parse("GET api"),
            Err(RouteError::Path("\"api\"".into()))
        );
        for method in ["G3T", "GET/"] {
            assert_eq!(
                Route::parse(&format!("{method} /api")),
                Err(RouteError::Method(format!("{method:?}")))
            );
        }
        assert_eq!(Route::parse("GET /a /b"), Err(RouteError::Shape));
        for glob in ["/a/***/b", "/a/**x/b", "/a**"] {
            assert_eq!(
                Route::parse(&format!("GET {glob}")),
                Err(RouteError::Glob(format!("{glob:?}")))
            );
        }
        assert!(Route::parse("patch /a/**").is_ok());
        let long = Route::parse(&format!("GET {}", "x".repeat(5_000))).unwrap_err();
        assert!(long.to_string().len() < 300, "{long}");
    }

    #[test]
    fn cache_answers_like_matching_and_stays_bounded() {
        let mut c = RouteCache::default();
        let mut computed = 0;
        for _ in 0..3 {
            let got = c.matches("GET", "/a", || {
                computed += 1;
                vec![1, 2]
            });
            assert_eq!(got, [1, 2]);
        }
        assert_eq!(c.matches("POST", "/a", || vec![3]), [3]);
        assert_eq!(computed, 1);
        for i in 0..RouteCache::CAPACITY + 10 {
            c.matches("GET", &format!("/u/{i}"), Vec::new);
        }
        assert!(c.paths.len() <= RouteCache::CAPACITY);
        // Methods invented for one path count too.
        for i in 0..RouteCache::CAPACITY + 10 {
            let method: String = format!("{i:04}")
                .bytes()
                .map(|d| char::from(b'A' + (d - b'0')))
                .collect();
            assert_eq!(c.matches(&method, "/a", || vec![9]), [9]);
        }
        let held: usize = c.paths.values().map(Vec::len).sum();
        assert!(held <= RouteCache::CAPACITY, "{held} pairs held");
        assert_eq!(held, c.entries);
    }
}
