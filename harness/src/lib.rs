//! kiln-harness: the `kiln` command line, doctor, backends and scenarios.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod diff;
pub mod doctor;
pub mod guest;
pub mod img;
pub mod nested;
pub mod report;
pub mod run_cmd;
pub mod runner;
pub mod scenario;
