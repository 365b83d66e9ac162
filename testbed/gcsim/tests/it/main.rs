//! gcsim's integration tests, one binary (links once): the simulator over
//! real sockets and the `gcsim` binary (`sim`).

mod sim;
