//! kiln-harness: the `kiln` command line, doctor, backends and scenarios.

pub mod bench;
pub mod cli;
pub mod doctor;
