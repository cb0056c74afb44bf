//! The `kiln` binary: everything lives in kiln-harness; this only hands over control.

fn main() -> std::process::ExitCode {
    kiln_harness::cli::main()
}
