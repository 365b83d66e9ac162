//! gcsim's integration tests, one binary (links once): the simulator over
//! real sockets (`sim`), and the fleet scenario's CI preset end to end
//! (`scenario`).

mod scenario;
mod sim;
