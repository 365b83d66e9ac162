//! gc-relay against a real gcsim and a real broker on 127.0.0.1 (one test
//! binary, so it links once).

mod cli;
mod common;
mod dead;
mod drain;
mod intake;
mod kill;
mod postgres;
