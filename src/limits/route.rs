//! Route patterns: `"METHOD /path/glob"` → does a call draw on a bucket.
//!
//! The path part is matched with `glob-match` (no regex compilation, no
//! allocation per match): `*` matches within one path segment, `**` any
//! number of whole segments, `?` one ASCII character other than `/`,
//! `[a-z]` / `[!0-9]` one ASCII character of a set or outside one, `{users,groups}`
//! one of its alternatives, and `\` makes the next character plain. The
//! method is an exact, case-insensitive HTTP method or `*` for any.
//!
//! Patterns are matched against request paths in normal form
//! ([`normalize_path`]), so a pattern that holds what no normal path holds
//! (a trailing `/`, `//`, a dot segment, a percent-escape, a query string)
//! would limit nothing: [`Route::parse`] refuses it, naming what to write.

use crate::error::clip;
use std::borrow::Cow;
use std::fmt;

/// Longest method a request may carry (`grpc::codec::call_of` refuses a
/// longer one): a pattern naming a longer one could never match.
pub(crate) const MAX_METHOD_LEN: usize = 16;

/// Most nested `{…}` the matcher follows; deeper, it matches nothing.
const MAX_BRACE_DEPTH: usize = 10;

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
    /// A method longer than any request's.
    #[error(
        "method {0} is longer than {MAX_METHOD_LEN} letters, the most a request's method may \
         be, so it would never match"
    )]
    MethodLength(String),
    /// The path holds what no normalised request path holds.
    #[error("{why}; write {write}")]
    NeverMatches {
        /// What in the pattern cannot match, and why.
        why: &'static str,
        /// The pattern that matches what was meant (clipped).
        write: String,
    },
    /// The path's glob syntax is broken, so it matches nothing.
    #[error("path {0}: {1}")]
    Syntax(String, &'static str),
}

impl RouteError {
    fn never(why: &'static str, method: &str, glob: &str) -> RouteError {
        RouteError::NeverMatches {
            why,
            write: clip(&format!("{method} {glob}")),
        }
    }
}

impl Route {
    /// Parses `"METHOD /path/glob"`.
    pub fn parse(s: &str) -> Result<Route, RouteError> {
        let mut parts = s.split_whitespace();
        let (Some(method), Some(glob), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(RouteError::Shape);
        };
        let written = method;
        let method = match method {
            "*" => None,
            // Letters: an HTTP method, or a name of the caller's own for a
            // slot that is no HTTP call (`JOB` for an ingestion job).
            m if m.len() > MAX_METHOD_LEN && m.chars().all(|c| c.is_ascii_alphabetic()) => {
                return Err(RouteError::MethodLength(clip(m)))
            }
            m if m.chars().all(|c| c.is_ascii_alphabetic()) => Some(m.to_ascii_uppercase()),
            m => return Err(RouteError::Method(clip(m))),
        };
        if !glob.starts_with('/') {
            return Err(RouteError::Path(clip(glob)));
        }
        if glob.split('/').any(|seg| seg.contains("**") && seg != "**") {
            return Err(RouteError::Glob(clip(glob)));
        }
        if let Some(problem) = syntax_problem(glob) {
            return Err(RouteError::Syntax(clip(glob), problem));
        }
        if let Some(e) = unmatchable(written, glob) {
            return Err(e);
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

/// Glob characters: a decoded one is written escaped (`\*`), and a `%`
/// next to one is left to the glob.
const GLOB_CHARS: &[u8] = b"*?[]{},\\";

/// What breaks a glob's syntax, if anything: the matcher answers "no" to
/// every path for an unclosed `[` or `{`, a trailing `\`, braces nested
/// too deep, and (matching bytes) for a non-ASCII character in a `[…]` set.
fn syntax_problem(glob: &str) -> Option<&'static str> {
    let b = glob.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if i + 1 == b.len() => {
                return Some(
                    "a trailing backslash escapes nothing, so the pattern matches nothing; \
                     a backslash itself is matched by two",
                )
            }
            b'\\' => i += 1,
            b'[' => {
                // As the matcher reads a set: `!` or `^` first negates it, a
                // `]` first is a member, `\` makes the next byte one.
                let mut j = i + 1;
                if matches!(b.get(j), Some(b'!' | b'^')) {
                    j += 1;
                }
                let first = j;
                loop {
                    match b.get(j) {
                        None => {
                            return Some(
                                "an unclosed \"[\" matches nothing; close the set (\"[ab]\"), \
                                 or put a backslash before it to match a \"[\" itself",
                            )
                        }
                        Some(b']') if j > first => break,
                        Some(b'\\') => j += 1,
                        _ => {}
                    }
                    if b.get(j).is_some_and(|c| !c.is_ascii()) {
                        return Some(
                            "a \"[…]\" set matches one byte, so a non-ASCII character in it \
                             matches nothing; give the choices as alternatives (\"{é,è}\")",
                        );
                    }
                    j += 1;
                }
                i = j;
            }
            b'{' => {
                depth += 1;
                if depth > MAX_BRACE_DEPTH {
                    return Some("\"{…}\" nested more than 10 deep matches nothing");
                }
            }
            // A `}` with no `{` open is a plain character.
            b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    (depth > 0).then_some(
        "an unclosed \"{\" matches nothing; close it (\"{a,b}\"), or put a backslash before \
         it to match a \"{\" itself",
    )
}

/// Why a route (`method` as written, and its `glob`) can match no request
/// path in normal form ([`normalize_path`]), with the pattern that matches
/// what was meant; `None` if it can.
fn unmatchable(method: &str, glob: &str) -> Option<RouteError> {
    let query = query_start(glob);
    let path = query.map_or(glob, |at| &glob[..at]);
    let Some(decoded) = decode_escapes(path) else {
        return Some(RouteError::Syntax(
            clip(glob),
            "its percent-escapes or characters decode to a control character or to bytes \
             that are not UTF-8, which no request path holds (a request with them is refused)",
        ));
    };
    let normal = resolve_segments(&decoded);
    let why = if query.is_some() {
        "a query string never matches: request paths are matched without theirs (in a \
         pattern, \"?\" matches any one character)"
    } else if decoded != path {
        "a percent-escape never matches: request paths are matched decoded, where only a \
         \"%\" itself is still spelled \"%25\" (\"?\" matches a space, which a pattern \
         cannot hold)"
    } else if normal == decoded {
        return None;
    } else if decoded.split('/').any(|s| s == "." || s == "..") {
        "a \".\" or \"..\" segment never matches: request paths are matched with dot \
         segments resolved"
    } else if decoded.ends_with('/') && !decoded[1..decoded.len() - 1].contains("//") {
        "a trailing \"/\" never matches: request paths are matched without it"
    } else {
        "an empty segment (\"//\") never matches: request paths are matched without them"
    };
    // A lone "%" kept for a glob character beside it that resolving took
    // away ("/%/*/.." → "/%") is spelled "%25" where it now stands alone.
    let write = decode_escapes(&normal).map_or_else(|| normal.clone(), Cow::into_owned);
    Some(RouteError::never(why, method, &write))
}

/// Where a query string starts in a glob: at a `?` (not escaped) followed
/// by `name=`, which the one-character wildcard `?` hardly ever is.
fn query_start(glob: &str) -> Option<usize> {
    glob.match_indices('?').map(|(at, _)| at).find(|&at| {
        let rest = &glob[at + 1..];
        !glob[..at].ends_with('\\')
            && rest.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(&c))
            })
    })
}

/// A glob's percent-escapes decoded as a request path's are: `%25` stays
/// (a normal path spells `%` so), a decoded glob character is escaped, a
/// space becomes `?` (a pattern cannot hold one), and a `%` that starts no
/// escape becomes `%25` unless a glob character beside it may be meant to
/// match the `25`. `None` if it decodes to what no normal path holds.
fn decode_escapes(path: &str) -> Option<Cow<'_, str>> {
    let decoded = if path.contains('%') {
        let b = path.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let escape = b
                .get(i + 1..i + 3)
                .filter(|h| b[i] == b'%' && h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match (b[i], escape) {
                (_, Some(b'%')) => out.extend_from_slice(b"%25"),
                (_, Some(b' ')) => out.push(b'?'),
                (_, Some(c)) if GLOB_CHARS.contains(&c) => out.extend_from_slice(&[b'\\', c]),
                (_, Some(c)) => out.push(c),
                (b'%', None) if !b[i + 1..].iter().take(2).any(|c| GLOB_CHARS.contains(c)) => {
                    out.extend_from_slice(b"%25");
                }
                (c, None) => out.push(c),
            }
            i += if escape.is_some() { 3 } else { 1 };
        }
        Cow::Owned(String::from_utf8(out).ok()?)
    } else {
        Cow::Borrowed(path)
    };
    (!decoded.chars().any(char::is_control)).then_some(decoded)
}

/// A path with empty segments dropped and dot segments resolved, as
/// [`normalize_path`] leaves a request path.
fn resolve_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    if segments.is_empty() {
        return "/".to_owned();
    }
    segments.iter().flat_map(|s| ["/", *s]).collect()
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

        /// What a refused pattern is told to write is accepted, and a
        /// pattern without glob characters is accepted just when it is a
        /// path in normal form.
        #[test]
        fn what_a_refusal_says_to_write_is_accepted(
            glob in "(/|//|/\\.|/\\.\\.|/[a-z%0-9?=*]{1,6}){1,8}/?"
        ) {
            let route = format!("GET {glob}");
            match Route::parse(&route) {
                Ok(_) if !glob.contains(['?', '*', '%']) => {
                    proptest::prop_assert_eq!(normalize_path(&glob), Ok(glob.clone()));
                }
                Ok(_) => {}
                Err(RouteError::NeverMatches { write, .. }) => {
                    let write: String = serde_json::from_str(&write).unwrap();
                    proptest::prop_assert!(Route::parse(&write).is_ok(), "{} → {}", route, write);
                }
                Err(RouteError::Glob(_)) => proptest::prop_assert!(glob.contains("**")),
                Err(e) => proptest::prop_assert!(glob.contains('%'), "{}: {}", route, e),
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
    fn patterns_no_normal_path_matches_are_refused_saying_what_to_write() {
        // (pattern, why, what to write, a request path its author meant)
        for (pattern, why, write, meant) in [
            ("GET /t/", "a trailing \"/\" never matches", "GET /t", "/t/"),
            ("GET //", "a trailing \"/\"", "GET /", "/"),
            (
                "get /a/../b",
                "a \".\" or \"..\" segment",
                "get /b",
                "/a/../b",
            ),
            (
                "GET /a/./b/",
                "a \".\" or \"..\" segment",
                "GET /a/b",
                "/a/b",
            ),
            (
                "GET /a//b/",
                "an empty segment (\"//\")",
                "GET /a/b",
                "/a//b",
            ),
            ("GET /p%20q", "a percent-escape", "GET /p?q", "/p%20q"),
            (
                "GET /caf%C3%A9",
                "a percent-escape",
                "GET /café",
                "/caf%c3%a9",
            ),
            ("GET /a%2fb/", "a percent-escape", "GET /a/b", "/a%2Fb"),
            ("GET /a%2Ab", "a percent-escape", "GET /a\\*b", "/a%2Ab"),
            ("GET /100%", "a percent-escape", "GET /100%25", "/100%"),
            // The "%" was kept for the "*" beside it, which ".." took away.
            (
                "GET /%/*/..",
                "a \".\" or \"..\" segment",
                "GET /%25",
                "/%25",
            ),
            ("GET /z?q=1", "a query string", "GET /z", "/z?q=1"),
            (
                "* /a?b/z/?q=1&r=2",
                "a query string",
                "* /a?b/z",
                "/axb/z?q=1",
            ),
        ] {
            let e = Route::parse(pattern).unwrap_err();
            let said = e.to_string();
            assert!(said.starts_with(why), "{pattern}: {said}");
            assert!(
                said.ends_with(&format!("; write {write:?}")),
                "{pattern}: {said}"
            );
            let path = normalize_path(meant.split('?').next().unwrap()).unwrap();
            let glob = pattern.split_once(' ').unwrap().1;
            assert!(
                !glob_match::glob_match(glob, &path),
                "{pattern} matched {path}"
            );
            let method = meant_method(pattern);
            assert!(m(write, &method, &path), "{write} does not match {path}");
        }
        // Kept: patterns a normal path can match.
        for pattern in [
            "GET /",
            "GET /a/**",
            "GET /a%25b",
            "GET /a?b",
            "GET /a%2*",
            "GET /a\\*b",
            "GET /a/{b,c}/?",
            "GET /q?",
        ] {
            assert!(Route::parse(pattern).is_ok(), "{pattern}");
        }
        assert!(m("GET /a%25b", "GET", &normalize_path("/a%25b").unwrap()));
    }

    fn meant_method(pattern: &str) -> String {
        match pattern.split_once(' ').unwrap().0 {
            "*" => "GET".to_owned(),
            m => m.to_ascii_uppercase(),
        }
    }

    #[test]
    fn broken_glob_syntax_and_methods_no_request_carries_are_refused() {
        for (glob, says) in [
            ("/a[b", "an unclosed \"[\""),
            ("/a[]", "an unclosed \"[\""),
            ("/a{b,c", "an unclosed \"{\""),
            ("/a\\", "a trailing backslash"),
            ("/caf[éè]", "a non-ASCII character"),
            ("/a%07", "a control character"),
            ("/a\u{7}", "a control character"),
            ("/a%ff", "not UTF-8"),
            ("/{{{{{{{{{{{a}}}}}}}}}}}", "nested more than 10 deep"),
        ] {
            let e = Route::parse(&format!("GET {glob}")).unwrap_err();
            assert!(matches!(e, RouteError::Syntax(..)), "{glob}: {e:?}");
            assert!(e.to_string().contains(says), "{glob}: {e}");
        }
        assert!(Route::parse("GET /a[]]").is_ok());
        assert!(Route::parse("GET /a}").is_ok());
        assert!(Route::parse("GET /{{{{{{{{{{a}}}}}}}}}}").is_ok());
        let e = Route::parse("INGESTIONJOBSLOTS /a").unwrap_err();
        assert_eq!(e, RouteError::MethodLength("\"INGESTIONJOBSLOTS\"".into()));
        assert!(e.to_string().contains("never match"), "{e}");
        assert!(Route::parse("INGESTIONJOBSLOT /a").is_ok());
        let long = Route::parse(&format!("GET /{}/", "x".repeat(5_000))).unwrap_err();
        assert!(long.to_string().len() < 500, "{long}");
    }

    /// `?`, `[…]` and `{…,…}` match request paths in normal form: after
    /// decoding, dropping `//` and a trailing `/`, resolving dot segments.
    #[test]
    fn sets_alternatives_and_single_characters_match_normalised_paths() {
        let matches = |pattern: &str, path: &str| m(pattern, "GET", &normalize_path(path).unwrap());
        let family = "GET /api/v2/{users,groups}/*";
        for path in [
            "/api/v2/users/abc",
            "/api/v2/groups/abc/",
            "/api/v2//users/./abc",
            "/api/v2/%75sers/abc",
        ] {
            assert!(matches(family, path), "{path}");
        }
        for path in ["/api/v2/usersx/abc", "/api/v2/users/abc/x", "/api/v2/users"] {
            assert!(!matches(family, path), "{path}");
        }
        let sets = "GET /api/v[12]/users/[!0-9]*";
        assert!(matches(sets, "/api/v1/users/me"));
        assert!(matches(sets, "/api/v2/users/%6De"));
        assert!(!matches(sets, "/api/v3/users/me"));
        assert!(!matches(sets, "/api/v1/users/42"));
        let one = "GET /api/v?/users";
        assert!(matches(one, "/api/v9/users"));
        assert!(matches(one, "/api/v%20/users"));
        for path in [
            "/api/v/users",
            "/api/v10/users",
            "/api/v//users",
            "/api/v%2F/users",
        ] {
            assert!(!matches(one, path), "{path}");
        }
        assert!(matches("GET /a/**/b", "/a/b"));
        // Alternatives may span segments, and hold wildcards.
        let nested = "GET /api/v2/{users/*,groups}/me";
        assert!(matches(nested, "/api/v2/users/x/me"));
        assert!(matches(nested, "/api/v2/groups/me"));
        assert!(!matches(nested, "/api/v2/users/me"));
        // A glob character is matched as itself after a backslash.
        assert!(matches("GET /a/\\*", "/a/%2A"));
        assert!(!matches("GET /a/\\*", "/a/b"));
        // `?` and sets match one byte: a non-ASCII character is spelled out
        // or given as alternatives.
        assert!(!matches("GET /caf?", "/caf%C3%A9"));
        assert!(matches("GET /caf{é,è}", "/caf%C3%A9"));
        assert!(matches("GET /café", "/caf%C3%A9"));
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
