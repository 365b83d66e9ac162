//! Integration tests: a real broker on 127.0.0.1:0 and real tonic clients.
//! One test binary with modules, so the suite links once.

mod acquire;
mod classes;
mod errors;
mod harness;
mod learning;
mod lifecycle;
mod process;
mod stream;
mod watch;
