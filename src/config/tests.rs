//! Unit tests of the settings: the embedded default, every key's checks
//! and their messages, the environment over the file, and file errors.

mod cluster;
mod defaults;
mod environment;
mod file_errors;
mod limits;
mod names;
mod problems;
mod server;
mod tokens;
