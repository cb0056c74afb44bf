//! kiln-harness: the `kiln` command line, doctor, backends and scenarios.

pub mod cli;
pub mod diff;
pub mod doctor;
pub mod img;
