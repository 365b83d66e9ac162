//! gcsim: a Genesys Cloud stand-in for the fleet scenario.
