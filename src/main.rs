//! The `kiln` binary: everything lives in kiln-cli; this only hands over control.

fn main() -> std::process::ExitCode {
    kiln_cli::main()
}
