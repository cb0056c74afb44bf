//! qemu-img's exit statuses, which `kiln img` answers with (and `kiln diff img` compares with
//! qemu-img's own). The `kiln` command lists them with its other codes (kiln-cli's `exit::img`).

/// The command did what was asked; `check`: the image is clean; `compare`: the images match.
pub const OK: i32 = 0;
/// `info`, `map`, `create`, `convert`: the command failed (one line on stderr).
pub const FAILED: i32 = 1;
/// `check`: the check itself could not be done (the image cannot be opened or read).
pub const CHECK_FAILED: i32 = 1;
/// `check`: the image is corrupt.
pub const CHECK_CORRUPT: i32 = 2;
/// `check`: only leaked clusters, no corruption.
pub const CHECK_LEAKS: i32 = 3;
/// `check`: the format has no consistency checks (raw).
pub const CHECK_UNSUPPORTED: i32 = 63;
/// `compare`: the images differ.
pub const DIFFERENT: i32 = 1;
/// `compare`: an image could not be opened.
pub const COMPARE_ERROR: i32 = 2;
/// `compare`: both images opened, but reading one failed (qemu-img: "Error while reading").
pub const COMPARE_READ_ERROR: i32 = 3;
