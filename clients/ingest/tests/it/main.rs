//! gc-ingest against real parts: gcsim (a hidden limit, an unmanaged
//! consumer, the jobs API) and the broker in process on 127.0.0.1, the
//! library and the `gc-ingest` binary, SQLite files and a PostgreSQL
//! server the set-up installs and starts. One binary (links once).

mod common;
mod ingest;
mod postgres;
mod resume;
