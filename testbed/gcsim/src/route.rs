//! Route patterns of the endpoint families: `"METHOD /path/glob"` → does a
//! request belong to the family.
//!
//! The simulator's own matcher, written apart from the broker's on purpose:
//! it stands in for the upstream, so it shares no code with the system under
//! test. The method is an HTTP method, compared case-insensitively, or `*`
//! for any. The path is split on `/`: a segment `**` matches any number of
//! whole segments (none included); in any other segment `*` matches any run
//! of characters within that segment, and every other character only
//! itself.

/// One parsed route pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    /// Upper-case method, or `None` for any.
    method: Option<String>,
    /// The path's segments after its leading `/`.
    segments: Vec<Segment>,
}

/// One segment of a path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of whole segments.
    AnyDepth,
    /// A segment, its `*`s matching within it.
    Glob(String),
}

impl Route {
    /// Parses `"METHOD /path/glob"`, or says what is wrong with it.
    pub(crate) fn parse(pattern: &str) -> Result<Route, String> {
        let mut parts = pattern.split_whitespace();
        let (Some(method), Some(path), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(
                "expected \"METHOD /path/glob\", e.g. \"POST /api/v2/analytics/**/query\"".into(),
            );
        };
        let method = match method {
            "*" => None,
            m if m.chars().all(|c| c.is_ascii_alphabetic()) => Some(m.to_ascii_uppercase()),
            m => return Err(format!("method {m:?} is not an HTTP method or \"*\"")),
        };
        let Some(path) = path.strip_prefix('/') else {
            return Err(format!("path {path:?} must start with '/'"));
        };
        if let Some(c) = path.chars().find(|c| "?[]{}".contains(*c)) {
            return Err(format!(
                "path /{path}: {c:?} is not supported (the wildcards are * and **)"
            ));
        }
        let segments = path
            .split('/')
            .map(|s| match s {
                "**" => Segment::AnyDepth,
                s => Segment::Glob(s.to_owned()),
            })
            .collect();
        Ok(Route { method, segments })
    }

    /// Whether a request with `method` to `path` (no query string) matches.
    pub(crate) fn matches(&self, method: &str, path: &str) -> bool {
        if self
            .method
            .as_deref()
            .is_some_and(|m| !m.eq_ignore_ascii_case(method))
        {
            return false;
        }
        path.strip_prefix('/')
            .is_some_and(|path| segments_match(&self.segments, Some(path)))
    }
}

/// Whether the pattern's segments match all of the path's; `path` is what
/// is left of it after a `/` (`None`: no segment left).
fn segments_match(pattern: &[Segment], path: Option<&str>) -> bool {
    match pattern.split_first() {
        None => path.is_none(),
        Some((Segment::AnyDepth, rest)) => {
            let mut at = path;
            loop {
                if segments_match(rest, at) {
                    return true;
                }
                match at {
                    None => return false,
                    Some(p) => at = p.split_once('/').map(|(_, tail)| tail),
                }
            }
        }
        Some((Segment::Glob(glob), rest)) => path.is_some_and(|p| {
            let (first, tail) = match p.split_once('/') {
                Some((first, tail)) => (first, Some(tail)),
                None => (p, None),
            };
            segment_matches(glob, first) && segments_match(rest, tail)
        }),
    }
}

/// Whether one path segment matches a segment pattern whose `*`s match any
/// run of characters. The parts between the stars are found left to right,
/// each as early as possible, which leaves the most room for the rest.
fn segment_matches(glob: &str, segment: &str) -> bool {
    let Some((head, tail)) = glob.split_once('*') else {
        return glob == segment;
    };
    let Some(mut rest) = segment.strip_prefix(head) else {
        return false;
    };
    let (middle, last) = tail.rsplit_once('*').unwrap_or(("", tail));
    for part in middle.split('*').filter(|p| !p.is_empty()) {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, method: &str, path: &str) -> bool {
        Route::parse(pattern).unwrap().matches(method, path)
    }

    #[test]
    fn double_star_spans_whole_segments() {
        let q = "POST /api/v2/analytics/**/query";
        assert!(m(
            q,
            "POST",
            "/api/v2/analytics/conversations/details/query"
        ));
        assert!(m(q, "POST", "/api/v2/analytics/queues/observations/query"));
        assert!(m(q, "POST", "/api/v2/analytics/query"));
        assert!(!m(
            q,
            "POST",
            "/api/v2/analytics/conversations/details/jobs"
        ));
        assert!(!m(q, "POST", "/api/v2/analytics/details/queryx"));
        assert!(!m(q, "POST", "/api/v2/analyticsx/details/query"));
        let w = "POST /api/v2/conversations/**";
        assert!(m(
            w,
            "POST",
            "/api/v2/conversations/calls/c1/participants/p/communications/m/wrapup"
        ));
        assert!(m(w, "POST", "/api/v2/conversations"));
        assert!(!m(w, "POST", "/api/v2/organizations/limits"));
        assert!(m("* /**", "DELETE", "/api/v2/users/me"));
        assert!(m("GET /a/**/b/**/c", "GET", "/a/x/b/y/z/c"));
        assert!(!m("GET /a/**/b/**/c", "GET", "/a/x/c"));
    }

    #[test]
    fn single_star_stays_within_a_segment() {
        assert!(m("GET /api/v2/users/*", "GET", "/api/v2/users/abc"));
        assert!(!m("GET /api/v2/users/*", "GET", "/api/v2/users/abc/queues"));
        assert!(m("GET /u/a*b*c", "GET", "/u/aXbYc"));
        assert!(m("GET /u/a*b*c", "GET", "/u/abc"));
        assert!(!m("GET /u/a*b*c", "GET", "/u/ac"));
        assert!(!m("GET /u/ab*ba", "GET", "/u/aba"));
        assert!(m("GET /u/*a*a", "GET", "/u/aa"));
        assert!(!m("GET /u/*a*a", "GET", "/u/a"));
        assert!(m("GET /u/*.json", "GET", "/u/x.json"));
        assert!(!m("GET /u/*.json", "GET", "/u/x/y.json"));
        assert!(m("GET /exact", "GET", "/exact"));
        assert!(!m("GET /exact", "GET", "/exact/"));
        assert!(!m("GET /exact", "GET", "exact"));
    }

    #[test]
    fn methods_ignore_case_or_match_any() {
        assert!(m("get /a", "GET", "/a"));
        assert!(m("GET /a", "get", "/a"));
        assert!(!m("GET /a", "POST", "/a"));
        assert!(m("* /a", "PATCH", "/a"));
    }

    #[test]
    fn bad_patterns_are_explained() {
        let err = |p: &str| Route::parse(p).unwrap_err();
        assert!(err("/api").contains("METHOD /path/glob"));
        assert!(err("GET /a /b").contains("METHOD /path/glob"));
        assert!(err("nope").contains("METHOD /path/glob"));
        assert!(err("GET api").contains("must start with '/'"));
        assert!(err("G3T /api").contains("not an HTTP method"));
        assert!(err("GET /a/{b,c}").contains("not supported"));
    }
}
