//! Integration tests: a real broker on 127.0.0.1:0 and real tonic clients.
//! One test binary with modules, so the suite links once.

mod acquire;
mod child;
mod classes;
mod cluster;
mod cluster_dashboard;
mod cluster_rejoin;
mod cluster_tls_errors;
mod dashboard;
mod errors;
mod harness;
mod invariants;
mod learning;
mod lifecycle;
mod observe;
mod overload;
mod process;
mod restart;
mod startup;
mod stream;
mod threads;
mod tls;
mod watch;
