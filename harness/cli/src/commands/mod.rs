//! One module per `kiln` subcommand that has more than a few lines of glue.

pub mod artifacts;
pub mod diff_img;
pub mod diff_run;
pub mod guest;
pub mod img;
pub mod run;
pub mod shell;
