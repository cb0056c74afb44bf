//! `kiln doctor`: what this host can run, for people and (with --json) for tools.
