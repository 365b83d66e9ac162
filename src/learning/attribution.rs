//! Which bucket of a call a 429 or rate-limit headers belong to, when the
//! call drew on several (the OAuth client's own, an org-wide one, an
//! endpoint family's).
//!
//! Headers that state a limit describe the budget of that size: the rate
//! bucket whose configured permits per window is closest to it (Genesys's
//! `inin-ratelimit-allowed: 300` is the per-OAuth-client budget; an
//! analytics limit of 60 is the analytics bucket's). Without a stated
//! limit: the narrowest org-wide bucket (lowest configured rate;
//! concurrency-only ones last), else the first bucket of the call.

/// One bucket a call drew on, as attribution sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    /// The caller's handle for the bucket.
    pub(crate) id: usize,
    /// Configured permits per window (`None`: no rate).
    pub(crate) permits: Option<u32>,
    /// Configured rate per minute (`None`: no rate).
    pub(crate) rate_per_min: Option<f64>,
    /// Org-wide (as opposed to one OAuth client's).
    pub(crate) org_wide: bool,
}

/// The candidate a report is attributed to; `stated_limit` is the limit the
/// headers state, if any.
pub(crate) fn attribute(candidates: &[Candidate], stated_limit: Option<u64>) -> Option<usize> {
    if let Some(limit) = stated_limit {
        let closest = candidates
            .iter()
            .filter_map(|c| c.permits.map(|p| (c.id, p)))
            .min_by_key(|&(_, permits)| (u64::from(permits).abs_diff(limit), permits));
        if let Some((id, _)) = closest {
            return Some(id);
        }
    }
    candidates
        .iter()
        .filter(|c| c.org_wide)
        .min_by(|a, b| {
            let rate = |c: &Candidate| c.rate_per_min.unwrap_or(f64::INFINITY);
            rate(a).total_cmp(&rate(b))
        })
        .map(|c| c.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: usize, permits: Option<u32>, per_min: Option<f64>, org_wide: bool) -> Candidate {
        Candidate {
            id,
            permits,
            rate_per_min: per_min,
            org_wide,
        }
    }

    #[test]
    fn a_stated_limit_picks_the_closest_rate_bucket() {
        let call = [
            c(0, Some(300), Some(300.0), false),
            c(1, Some(60), Some(60.0), true),
            c(2, None, None, true),
        ];
        assert_eq!(attribute(&call, Some(300)), Some(0));
        assert_eq!(attribute(&call, Some(45)), Some(1));
    }

    #[test]
    fn without_a_limit_the_narrowest_org_bucket_then_none() {
        let call = [
            c(0, Some(300), Some(300.0), false),
            c(1, None, None, true),
            c(2, Some(60), Some(60.0), true),
        ];
        assert_eq!(attribute(&call, None), Some(2), "lowest rate first");
        assert_eq!(
            attribute(&call[..2], None),
            Some(1),
            "concurrency-only last"
        );
        assert_eq!(attribute(&call[..1], None), None, "no org-wide bucket");
    }
}
