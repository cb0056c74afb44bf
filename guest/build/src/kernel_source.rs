//! `--from-source DIR|TARBALL`: a small kernel built from `make tinyconfig` plus kiln's fragment
//! (guest/kernel/kiln.config, the same file flake.nix uses), everything built in, no modules.
//! Out of tree (`make O=`) under the cache, so the source stays untouched and a rebuild is
//! incremental.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::cache::{sha256_hex, Source};
use super::{GuestError, KernelParts, Progress};

/// kiln's kernel config fragment, compiled in so an installed `kiln` has it.
pub const KILN_CONFIG: &str = include_str!("../../../guest/kernel/kiln.config");

/// Tools a kernel build needs, and the Debian packages that give them.
const TOOLS: &[&str] = &["make", "gcc", "flex", "bison", "bc", "perl"];
const TOOLS_HINT: &str = "apt-get install build-essential flex bison bc libelf-dev libssl-dev";

/// `CONFIG_NAME` → value (`y`, `m`, `"string"`, or `n` for `# CONFIG_NAME is not set`).
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            out.insert(name.to_owned(), "n".to_owned());
        } else if let Some((name, value)) = line.split_once('=') {
            if name.starts_with("CONFIG_") {
                out.insert(name.to_owned(), value.to_owned());
            }
        }
    }
    out
}

/// Fragment options the merged `.config` did not end up with (`NAME=wanted (got value)`): a
/// dependency was missing or the option does not exist in this kernel version.
pub fn unmet(fragment: &str, merged: &str) -> Vec<String> {
    let merged = parse_config(merged);
    parse_config(fragment)
        .into_iter()
        .filter_map(|(name, wanted)| {
            let got = merged.get(&name).map(String::as_str).unwrap_or("n");
            (got != wanted).then(|| format!("{name}={wanted} (got {got})"))
        })
        .collect()
}

/// The commands of a build, in order: tinyconfig, merge the fragment, resolve dependencies,
/// build bzImage.
pub fn plan(src: &Path, out: &Path, fragment: &Path, jobs: usize) -> Vec<Vec<String>> {
    let s = |p: &Path| p.display().to_string();
    let make = |target: &str| {
        vec![
            "make".to_owned(),
            "-C".to_owned(),
            s(src),
            format!("O={}", s(out)),
            target.to_owned(),
        ]
    };
    let mut build = make("bzImage");
    build.insert(1, format!("-j{jobs}"));
    vec![
        make("tinyconfig"),
        vec![
            s(&src.join("scripts/kconfig/merge_config.sh")),
            "-m".to_owned(),
            "-O".to_owned(),
            s(out),
            s(&out.join(".config")),
            s(fragment),
        ],
        make("olddefconfig"),
        build,
    ]
}

fn check_tools() -> Result<(), GuestError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in TOOLS {
        if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
            return Err(GuestError::Invalid(format!(
                "building a kernel needs {tool}, which is not on PATH: {TOOLS_HINT}"
            )));
        }
    }
    Ok(())
}

/// The kernel tree: `DIR` itself, or the single top-level directory of `TARBALL` unpacked
/// under `work`.
fn source_dir(given: &Path, work: &Path, progress: &Progress) -> Result<PathBuf, GuestError> {
    if given.is_dir() {
        if !given.join("Makefile").is_file() || !given.join("arch/x86").is_dir() {
            return Err(GuestError::Invalid(format!(
                "--from-source {}: not a Linux source tree (no Makefile or arch/x86)",
                given.display()
            )));
        }
        return Ok(given.to_owned());
    }
    if !given.is_file() {
        return Err(GuestError::Invalid(format!(
            "--from-source {}: no such directory or tarball",
            given.display()
        )));
    }
    let unpacked = work.join("src");
    let done = work.join("src.unpacked");
    if !done.exists() {
        let _ = fs::remove_dir_all(&unpacked);
        fs::create_dir_all(&unpacked).map_err(|source| GuestError::Io {
            path: unpacked.clone(),
            source,
        })?;
        progress(&format!("unpacking {}", given.display()));
        super::run_tool(
            Command::new("tar")
                .arg("-xf")
                .arg(given)
                .arg("-C")
                .arg(&unpacked),
            "tar",
            "apt-get install tar xz-utils",
        )?;
        fs::write(&done, b"").map_err(|source| GuestError::Io {
            path: done.clone(),
            source,
        })?;
    }
    let mut tops: Vec<_> = fs::read_dir(&unpacked)
        .map_err(|source| GuestError::Io {
            path: unpacked.clone(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("Makefile").is_file())
        .collect();
    match tops.len() {
        1 => Ok(tops.remove(0)),
        _ => Err(GuestError::Invalid(format!(
            "--from-source {}: expected one top-level kernel directory in the tarball",
            given.display()
        ))),
    }
}

/// Configure and build the kernel; takes minutes.
pub fn kernel_from_source(
    given: &Path,
    cache_root: &Path,
    progress: &Progress,
) -> Result<KernelParts, GuestError> {
    let given = given
        .canonicalize()
        .map_err(|e| GuestError::Invalid(format!("--from-source {}: {e}", given.display())))?;
    check_tools()?;
    let config_sha = sha256_hex(KILN_CONFIG.as_bytes());
    let key = sha256_hex(format!("{}\n{config_sha}", given.display()).as_bytes());
    let work = cache_root.join("kernel-build").join(&key[..16]);
    let src = source_dir(&given, &work, progress)?;
    let out = work.join("out");
    fs::create_dir_all(&out).map_err(|source| GuestError::Io {
        path: out.clone(),
        source,
    })?;
    let fragment = out.join("kiln.config");
    fs::write(&fragment, KILN_CONFIG).map_err(|source| GuestError::Io {
        path: fragment.clone(),
        source,
    })?;
    let jobs = std::thread::available_parallelism().map_or(2, usize::from);
    let log = work.join("build.log");
    let steps = plan(&src, &out, &fragment, jobs);
    for (i, step) in steps.iter().enumerate() {
        if i + 1 == steps.len() {
            let merged = fs::read_to_string(out.join(".config")).unwrap_or_default();
            for option in unmet(KILN_CONFIG, &merged) {
                progress(&format!(
                    "warning: kiln.config option not applied: {option}"
                ));
            }
            progress(&format!(
                "building bzImage with make -j{jobs} (several minutes on 2 cores; log: {})",
                log.display()
            ));
        } else {
            progress(&format!("running {}", step.join(" ")));
        }
        run_logged(step, &src, &log)?;
    }
    let bzimage = out.join("arch/x86/boot/bzImage");
    let image = fs::read(&bzimage).map_err(|source| GuestError::Io {
        path: bzimage.clone(),
        source,
    })?;
    let release = fs::read_to_string(out.join("include/config/kernel.release"))
        .ok()
        .map(|r| r.trim().to_owned());
    Ok(KernelParts {
        image,
        release,
        modules: Vec::new(),
        source: Source::KernelSource {
            path: given.display().to_string(),
            config_sha256: config_sha,
        },
    })
}

/// The line of a build log that says why it failed: the first compiler `error:` (make's own
/// "Error 2" lines only repeat that something failed), else the last line.
fn first_error(log: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains("error:") && !l.starts_with("make"))
        .or_else(|| log.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .trim();
    if line.contains("libelf.h") || line.contains("gelf.h") {
        format!("{line} ({TOOLS_HINT})")
    } else {
        line.to_owned()
    }
}

fn run_logged(argv: &[String], cwd: &Path, log: &Path) -> Result<(), GuestError> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| GuestError::Io {
            path: log.to_owned(),
            source,
        })?;
    let err = file.try_clone().map_err(|source| GuestError::Io {
        path: log.to_owned(),
        source,
    })?;
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(|e| GuestError::Invalid(format!("cannot run {}: {e} ({TOOLS_HINT})", argv[0])))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let last = first_error(&text);
    Err(GuestError::Invalid(format!(
        "`{}` failed ({status}): {last} (full log: {})",
        argv.join(" "),
        log.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_has_what_the_guest_needs() {
        let config = parse_config(KILN_CONFIG);
        for option in [
            "CONFIG_64BIT",
            "CONFIG_PVH",
            "CONFIG_KVM_GUEST",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_PCI",
            "CONFIG_ACPI",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_EXT4_FS",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_VIRTIO_FS",
            "CONFIG_9P_FS",
            "CONFIG_NET_9P_VIRTIO",
            "CONFIG_VIRTIO_CONSOLE",
            "CONFIG_HW_RANDOM_VIRTIO",
            "CONFIG_DEVTMPFS_MOUNT",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_RD_GZIP",
            "CONFIG_BINFMT_ELF",
            "CONFIG_BINFMT_SCRIPT",
            "CONFIG_FUTEX",
            "CONFIG_UNIX",
            "CONFIG_TMPFS",
            "CONFIG_PROC_FS",
            "CONFIG_SYSFS",
            "CONFIG_PRINTK",
        ] {
            assert_eq!(
                config.get(option).map(String::as_str),
                Some("y"),
                "{option}"
            );
        }
        // Built in: the source kernel has no module loading to rely on.
        assert!(!config.values().any(|v| v == "m"));
    }

    #[test]
    fn unmet_options_are_reported() {
        let fragment =
            "CONFIG_PVH=y\nCONFIG_9P_FS=y\n# CONFIG_MODULES is not set\nCONFIG_CMDLINE=\"x\"\n";
        let merged = "CONFIG_PVH=y\n# CONFIG_9P_FS is not set\nCONFIG_CMDLINE=\"x\"\n";
        assert_eq!(unmet(fragment, merged), ["CONFIG_9P_FS=y (got n)"]);
        assert!(unmet(
            fragment,
            "CONFIG_PVH=y\nCONFIG_9P_FS=y\nCONFIG_CMDLINE=\"x\"\n"
        )
        .is_empty());
    }

    #[test]
    fn the_plan_merges_the_fragment_into_tinyconfig_out_of_tree() {
        let steps = plan(
            Path::new("/src/linux"),
            Path::new("/c/out"),
            Path::new("/c/out/kiln.config"),
            2,
        );
        let lines: Vec<String> = steps.iter().map(|s| s.join(" ")).collect();
        assert_eq!(
            lines,
            [
                "make -C /src/linux O=/c/out tinyconfig",
                "/src/linux/scripts/kconfig/merge_config.sh -m -O /c/out /c/out/.config /c/out/kiln.config",
                "make -C /src/linux O=/c/out olddefconfig",
                "make -j2 -C /src/linux O=/c/out bzImage",
            ]
        );
    }

    #[test]
    fn the_build_error_line_is_the_compilers() {
        let log = "  CC      kernel/fork.o\n<stdin>:1:10: fatal error: libelf.h: No such file or directory\nmake[1]: *** Error 2\nmake: *** [Makefile:250: __sub-make] Error 2\n";
        assert_eq!(
            first_error(log),
            format!(
                "<stdin>:1:10: fatal error: libelf.h: No such file or directory ({TOOLS_HINT})"
            )
        );
        assert_eq!(first_error("a\nlast words\n"), "last words");
    }

    #[test]
    fn a_non_kernel_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = source_dir(dir.path(), dir.path(), &|_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("not a Linux source tree (no Makefile or arch/x86)"),
            "{err}"
        );
        let err = source_dir(Path::new("/nonexistent/linux.tar.xz"), dir.path(), &|_| {})
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--from-source /nonexistent/linux.tar.xz: no such directory or tarball"
        );
    }
}
