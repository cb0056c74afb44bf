//! `kiln boot`'s wording of the VMM's start errors. The VMM names the [`VmConfig`] field at fault
//! (`the kernel image PATH`, `VmConfig.vcpus`, `share TAG (DIR)`); a user of `kiln boot` set it
//! with an option, so the same error names the option here (`--kernel PATH`, `--vcpus N`,
//! `--share TAG=DIR`). Errors no option causes read as the VMM words them.
//!
//! [`VmConfig`]: kiln_vmm::VmConfig

use std::fmt;

use kiln_devices::virtio::fs::{FsError, TAG_MAX_LEN};
use kiln_devices::virtio::vsock::VsockError;
use kiln_vmm::boot::cmdline::CmdlineError;
use kiln_vmm::boot::{BootError, BootFile};
use kiln_vmm::memory::{MemoryError, MIN_MEMORY_MIB};
use kiln_vmm::Error;

/// Displays a VMM start error in the words of `kiln boot`'s options.
pub struct ByOption<'a>(pub &'a Error);

impl fmt::Display for ByOption<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Error::Vcpus { count, problem } => write!(f, "--vcpus {count}: {problem}"),
            Error::Memory(MemoryError::Size { mib }) => write!(
                f,
                "--memory {mib} MiB is out of range: kiln needs at least {MIN_MEMORY_MIB} MiB"
            ),
            Error::Boot(e) => boot(f, e),
            Error::Cmdline(e) => cmdline(f, e),
            Error::Share(e) => share(f, e),
            Error::Vsock(e) => vsock(f, e),
            Error::Disk(e) => write!(f, "{}", e.with_option("--disk")),
            other => write!(f, "{other}"),
        }
    }
}

fn boot(f: &mut fmt::Formatter<'_>, e: &BootError) -> fmt::Result {
    match e {
        BootError::Io { file, path, source } => {
            let option = match file {
                BootFile::Kernel => "--kernel",
                BootFile::Initrd => "--initrd",
            };
            write!(f, "{option} {}: {source}", path.display())
        }
        BootError::UnknownFormat { path } => write!(
            f,
            "--kernel {}: neither an ELF nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)",
            path.display()
        ),
        BootError::WrongMachine { path, what } => write!(
            f,
            "--kernel {}: {what}; kiln boots 64-bit x86-64 (EM_X86_64 = 62) kernels",
            path.display()
        ),
        BootError::Load { path, source } => write!(f, "--kernel {}: {source}", path.display()),
        BootError::LowEntry { path } => write!(
            f,
            "--kernel {}: the ELF entry point is below 1 MiB (0x100000); \
             is this a program rather than a kernel?",
            path.display()
        ),
        BootError::KernelTooLarge { path, mem_end } => write!(
            f,
            "--kernel {}: the image does not fit in guest memory (RAM ends at {mem_end:#x}); \
             raise --memory",
            path.display()
        ),
        BootError::InitrdTooLarge {
            path,
            size,
            kernel_end,
            mem_end,
        } => write!(
            f,
            "--initrd {}: {size} bytes do not fit in guest memory above the kernel \
             (kernel ends at {kernel_end:#x}, low memory ends at {mem_end:#x}); raise --memory",
            path.display()
        ),
        other => write!(f, "{other}"),
    }
}

fn cmdline(f: &mut fmt::Formatter<'_>, e: &CmdlineError) -> fmt::Result {
    match e {
        CmdlineError::TooLong { len, limit } => write!(
            f,
            "--cmdline: the command line would be {len} bytes, the limit is {limit} bytes"
        ),
        CmdlineError::BadCharacter { part } => write!(
            f,
            "--cmdline: {part:?} has a character that is not printable ASCII"
        ),
    }
}

fn share(f: &mut fmt::Formatter<'_>, e: &FsError) -> fmt::Result {
    match e {
        FsError::EmptyTag => write!(
            f,
            "--share: the tag is empty; expected --share TAG=DIR with a tag of 1 to \
             {TAG_MAX_LEN} bytes"
        ),
        FsError::TagTooLong { tag, len } => write!(
            f,
            "--share {tag}: the tag is {len} bytes long; at most {TAG_MAX_LEN} bytes fit in the \
             virtio-fs config space"
        ),
        FsError::TagHasNul { tag } => write!(f, "--share {tag:?}: the tag contains a NUL byte"),
        FsError::DirUnusable { tag, dir, source } => write!(
            f,
            "--share {tag}={}: cannot use the directory: {source}",
            dir.display()
        ),
        FsError::NotADir { tag, dir } => {
            write!(f, "--share {tag}={}: not a directory", dir.display())
        }
        FsError::NonUtf8Dir { tag, dir } => write!(
            f,
            "--share {tag}={}: the directory path is not valid UTF-8",
            dir.display()
        ),
        FsError::Backend { tag, dir, source } => write!(
            f,
            "--share {tag}={}: cannot start the file server: {source}",
            dir.display()
        ),
    }
}

fn vsock(f: &mut fmt::Formatter<'_>, e: &VsockError) -> fmt::Result {
    match e {
        VsockError::PathInUse(path) => write!(
            f,
            "--vsock {}: the path is in use (remove it or choose another path)",
            path.display()
        ),
        VsockError::Listen { path, source } => write!(
            f,
            "--vsock {}: cannot listen on the Unix socket: {source}",
            path.display()
        ),
        other => write!(f, "{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_devices::virtio::fs::VirtioFs;
    use kiln_devices::virtio::vsock::{Vsock, GUEST_CID};
    use kiln_vmm::boot::cmdline::{build_cmdline, DEFAULT_CMDLINE};
    use kiln_vmm::VcpusProblem;

    fn by_option(e: impl Into<Error>) -> String {
        ByOption(&e.into()).to_string()
    }

    #[test]
    fn vmm_errors_name_the_option() {
        let e = Error::Vcpus {
            count: 0,
            problem: VcpusProblem::Zero,
        };
        assert_eq!(
            e.to_string(),
            "VmConfig.vcpus = 0: a VM needs at least one vCPU"
        );
        assert_eq!(
            ByOption(&e).to_string(),
            "--vcpus 0: a VM needs at least one vCPU"
        );
        assert_eq!(
            by_option(MemoryError::Size { mib: 1 }),
            "--memory 1 MiB is out of range: kiln needs at least 2 MiB"
        );
        let room = 2047 - DEFAULT_CMDLINE.len() - 1;
        let long = build_cmdline(&[], Some(&"a".repeat(room + 1)), 2048).unwrap_err();
        assert_eq!(
            by_option(long),
            "--cmdline: the command line would be 2048 bytes, the limit is 2047 bytes"
        );
        let wrong = BootError::WrongMachine {
            path: "k".into(),
            what: "ELF machine 183".into(),
        };
        assert_eq!(
            by_option(wrong),
            "--kernel k: ELF machine 183; kiln boots 64-bit x86-64 (EM_X86_64 = 62) kernels"
        );
        let missing = BootError::Io {
            file: BootFile::Initrd,
            path: "/nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(by_option(missing), "--initrd /nope: entity not found");
        let big = BootError::KernelTooLarge {
            path: "k".into(),
            mem_end: 0x20_0000,
        };
        assert_eq!(
            by_option(big),
            "--kernel k: the image does not fit in guest memory (RAM ends at 0x200000); \
             raise --memory"
        );
    }

    #[test]
    fn device_errors_name_the_option() {
        let dir = tempfile::tempdir().expect("tempdir");
        let share = |tag: &str, path: &std::path::Path| {
            by_option(VirtioFs::new(tag, path, false).err().expect("share error"))
        };
        assert_eq!(
            share("", dir.path()),
            "--share: the tag is empty; expected --share TAG=DIR with a tag of 1 to 36 bytes"
        );
        let missing = dir.path().join("missing");
        let msg = share("out", &missing);
        assert!(
            msg.starts_with(&format!(
                "--share out={}: cannot use the directory: ",
                missing.display()
            )),
            "{msg}"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        assert_eq!(
            share("out", &file),
            format!("--share out={}: not a directory", file.display())
        );
        let busy = dir.path().join("busy.sock");
        std::fs::write(&busy, b"").expect("write");
        let err = Vsock::new(&busy, GUEST_CID).err().expect("in use");
        assert_eq!(
            by_option(err),
            format!(
                "--vsock {}: the path is in use (remove it or choose another path)",
                busy.display()
            )
        );
    }
}
