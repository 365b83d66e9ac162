//! Learning from what the upstream answers: the rate-limit headers parsed
//! (`headers`), the bucket a 429 or headers belong to (`attribution`), and
//! the rules that turn them into a freeze and an effective rate
//! (`adaptive`), what the fleet was served per second and per slot of a
//! window (`served`), the view of the upstream's remaining budget
//! (`budget`), and a concurrency limit the upstream keeps to itself
//! (`concurrency`). Pure: the clock is passed in; the tenant applies the
//! results to its bucket instances.

mod adaptive;
mod attribution;
mod budget;
mod concurrency;
mod headers;
mod served;

pub(crate) use adaptive::{LearnSettings, Learned, Learner, Persisted};
pub(crate) use attribution::{attribute, Candidate};
pub(crate) use budget::UpstreamBudget;
pub(crate) use concurrency::SlotLearner;
pub(crate) use headers::{parse as parse_headers, RateLimitInfo};
