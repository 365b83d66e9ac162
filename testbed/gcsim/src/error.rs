//! The simulator's errors: a bad config (every problem listed) or an I/O
//! failure starting or serving.

/// Why the simulator could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The config has problems; each is one line a person can act on.
    #[error("bad simulator config:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// Reading the config, binding or serving failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
}
