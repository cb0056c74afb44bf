//! What the agent does as PID 1 of an initramfs: mount the kernel file systems, give itself a
//! console, load modules, mount shares, set the hostname; and power off or reboot on request.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use crate::children;
use crate::cmdline::Share;

/// Modules to load at boot: one `.ko` path per line (optionally followed by parameters), in
/// dependency order; blank lines and `#` comments are ignored.
pub const MODULES_LIST: &str = "/etc/kiln/modules";

/// The hostname the guest gets.
pub const HOSTNAME: &str = "kiln";

/// `PATH` for commands when the kernel gave the agent none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// 9p mount options: the virtio transport, the Linux dialect, and 256 KiB messages (the default
/// 8 KiB makes file transfers crawl).
const NINEP_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=262144";

fn cstring(text: &[u8]) -> io::Result<CString> {
    CString::new(text).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} contains a NUL byte", String::from_utf8_lossy(text)),
        )
    })
}

/// mount(2), creating the mountpoint first.
fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    fs::create_dir_all(target)?;
    let (source, fstype, data) = (
        cstring(source.as_bytes())?,
        cstring(fstype.as_bytes())?,
        cstring(data.as_bytes())?,
    );
    let target_c = cstring(target.as_os_str().as_bytes())?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mount /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /tmp and /run; returns one warning per
/// failure (a mount that is already there counts as done).
pub fn mount_system() -> Vec<String> {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 7] = [
        ("proc", "/proc", "proc", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
    ];
    let mut warnings = Vec::new();
    for (source, target, fstype, flags, data) in mounts {
        match mount(source, Path::new(target), fstype, flags, data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => warnings.push(format!("cannot mount {fstype} on {target}: {e}")),
        }
    }
    warnings
}

/// Make sure fds 0-2 are open, on /dev/console (the kernel opens it for init only when the
/// initramfs has a /dev/console node).
pub fn ensure_console() {
    // SAFETY: F_GETFD only inspects the descriptor.
    let missing = (0..3).any(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1);
    if !missing {
        return;
    }
    let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: F_GETFD only inspects the descriptor; dup2 onto a closed slot is what we want.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) == -1 {
                libc::dup2(console.as_raw_fd(), fd);
            }
        }
    }
}

/// Set the hostname.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One line of the modules list: the `.ko` path and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleLine {
    /// Path of the `.ko` file.
    pub path: String,
    /// Module parameters (`name=value ...`), possibly empty.
    pub params: String,
}

/// Parse the modules list.
pub fn parse_modules_list(text: &str) -> Vec<ModuleLine> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| match line.split_once(char::is_whitespace) {
            Some((path, params)) => ModuleLine {
                path: path.to_owned(),
                params: params.trim().to_owned(),
            },
            None => ModuleLine {
                path: line.to_owned(),
                params: String::new(),
            },
        })
        .collect()
}

/// Load the modules listed in `list` (missing list: nothing to do); one warning per failure.
pub fn load_modules(list: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(list) else {
        return Vec::new();
    };
    parse_modules_list(&text)
        .into_iter()
        .filter_map(|module| {
            load_module(&module)
                .err()
                .map(|e| format!("cannot load module {}: {e}", module.path))
        })
        .collect()
}

fn load_module(module: &ModuleLine) -> io::Result<()> {
    let file = File::open(&module.path)?;
    let params = cstring(module.params.as_bytes())?;
    let flags = module_flags(&module.path);
    // SAFETY: finit_module(2) with an open fd, a NUL-terminated parameter string and flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // Already loaded (or built in) is what we wanted.
    if e.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(e)
    }
}

/// `MODULE_INIT_COMPRESSED_FILE` (linux/module.h): the kernel decompresses the module itself
/// (CONFIG_MODULE_DECOMPRESS). The image builder decompresses `.xz`/`.gz` on the host and packs
/// `.zst` as is, so this is only needed for kernels that ship zstd modules (Ubuntu's).
const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;

fn module_flags(path: &str) -> libc::c_int {
    if [".zst", ".xz", ".gz"].iter().any(|s| path.ends_with(s)) {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    }
}

/// Mount a share: virtiofs first (kiln's VMM, virtiofsd), then 9p (QEMU).
pub fn mount_share(share: &Share) -> Result<&'static str, String> {
    let flags = if share.read_only { libc::MS_RDONLY } else { 0 };
    let virtiofs = match mount(&share.tag, &share.mountpoint, "virtiofs", flags, "") {
        Ok(()) => return Ok("virtiofs"),
        Err(e) => e,
    };
    match mount(&share.tag, &share.mountpoint, "9p", flags, NINEP_OPTIONS) {
        Ok(()) => Ok("9p"),
        Err(ninep) => Err(format!(
            "cannot mount share {:?} on {}: virtiofs: {virtiofs}; 9p: {ninep}",
            share.tag,
            share.mountpoint.display()
        )),
    }
}

/// Power off (or reboot) the guest. As PID 1 through reboot(2) after sync; as a service by
/// asking systemd. Returns only when that failed.
pub fn power_off(reboot: bool, pid1: bool) -> io::Error {
    if pid1 {
        // SAFETY: sync(2) and reboot(2) take no pointers; reboot only returns on failure.
        unsafe {
            libc::sync();
            libc::reboot(if reboot {
                libc::RB_AUTOBOOT
            } else {
                libc::RB_POWER_OFF
            });
        }
        return io::Error::last_os_error();
    }
    let verb = if reboot { "reboot" } else { "poweroff" };
    match children::spawn(Command::new("systemctl").arg(verb), |_| {}) {
        Ok(_) => io::Error::other(format!("asked systemd to {verb}")),
        Err(e) => io::Error::other(format!("cannot run systemctl {verb}: {e}")),
    }
}

/// The boot id from `/proc/sys/kernel/random/boot_id`, or random hex when it is missing.
pub fn boot_id() -> String {
    match fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => random_hex(),
    }
}

fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut text = String::new();
    for i in 0..2u64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(i);
        text.push_str(&format!("{:016x}", hasher.finish()));
    }
    text
}

/// Milliseconds since the kernel started: CLOCK_BOOTTIME, the clock /proc/uptime shows, read
/// directly for millisecond rather than /proc/uptime's 10 ms resolution.
pub fn ms_since_boot() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_list_skips_comments_and_keeps_parameters() {
        let list =
            "# virtio first\n/lib/modules/virtio_mmio.ko\n\n  /lib/modules/9p.ko  debug=1 x=2 \n";
        assert_eq!(
            parse_modules_list(list),
            vec![
                ModuleLine {
                    path: "/lib/modules/virtio_mmio.ko".into(),
                    params: String::new()
                },
                ModuleLine {
                    path: "/lib/modules/9p.ko".into(),
                    params: "debug=1 x=2".into()
                },
            ]
        );
    }

    #[test]
    fn compressed_modules_ask_the_kernel_to_decompress() {
        assert_eq!(module_flags("/lib/modules/x/9p.ko"), 0);
        assert_eq!(
            module_flags("/lib/modules/x/9p.ko.zst"),
            MODULE_INIT_COMPRESSED_FILE
        );
    }

    #[test]
    fn missing_modules_list_loads_nothing() {
        assert!(load_modules(Path::new("/nonexistent/kiln/modules")).is_empty());
    }

    #[test]
    fn boot_clock_and_id_are_available() {
        assert!(ms_since_boot() > 0);
        let id = boot_id();
        assert!(!id.is_empty() && !id.contains(char::is_whitespace), "{id}");
        assert_eq!(random_hex().len(), 32);
    }
}
