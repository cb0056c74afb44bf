//! Loading a kernel and initrd and writing the boot structures for its entry protocol:
//! PVH (ELF with a PVH note, `hvm_start_info`) or the 64-bit Linux boot protocol (`boot_params`).

pub mod cmdline;
mod params;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, GuestMemoryRegion as _};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::memory::{low_memory_end, GuestMemory};

pub use params::{boot_params, start_info, write_boot_params, write_start_info};

/// ELF machine number for x86-64.
const EM_X86_64: u16 = 62;
/// Offset of the "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// The 64-bit entry point of a bzImage sits 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Kernel image formats kiln boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An x86-64 ELF (vmlinux or a bare-metal guest).
    Elf,
    /// A bzImage.
    BzImage,
}

/// How the vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, `%ebx` = `hvm_start_info`.
    Pvh(GuestAddress),
    /// 64-bit Linux boot protocol: long mode, `%rsi` = `boot_params`.
    Linux64(GuestAddress),
}

/// Which of the files a VM boots from an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFile {
    /// [`crate::VmConfig::kernel`].
    Kernel,
    /// [`crate::VmConfig::initrd`].
    Initrd,
}

impl std::fmt::Display for BootFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootFile::Kernel => "the kernel image",
            BootFile::Initrd => "the initrd",
        })
    }
}

/// Kernel and initrd loading errors; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd could not be opened or read.
    #[error("{file} {path}: {source}")]
    Io {
        /// The kernel or the initrd.
        file: BootFile,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a format kiln can boot.
    #[error(
        "the kernel image {path}: neither an ELF nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)"
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// An ELF for another machine or word size.
    #[error("the kernel image {path}: {what}; kiln boots 64-bit x86-64 (EM_X86_64 = 62) kernels")]
    WrongMachine {
        /// The file.
        path: PathBuf,
        /// What the header says.
        what: String,
    },
    /// linux-loader refused the image (bad headers, does not fit in memory…).
    #[error("the kernel image {path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What linux-loader reported.
        source: linux_loader::loader::Error,
    },
    /// An ELF whose entry point is below 1 MiB: a user-space program, not a kernel.
    #[error(
        "the kernel image {path}: the ELF entry point is below 1 MiB (0x100000); \
         is this a program rather than a kernel?"
    )]
    LowEntry {
        /// The file.
        path: PathBuf,
    },
    /// The kernel image does not fit in guest memory.
    #[error(
        "the kernel image {path}: the image does not fit in guest memory \
         (RAM ends at {mem_end:#x}); raise VmConfig.memory_mib"
    )]
    KernelTooLarge {
        /// The file.
        path: PathBuf,
        /// End of guest RAM.
        mem_end: u64,
    },
    /// Kernel and initrd do not fit in guest memory together.
    #[error(
        "the initrd {path}: {size} bytes do not fit in guest memory above the kernel \
         (kernel ends at {kernel_end:#x}, low memory ends at {mem_end:#x}); \
         raise VmConfig.memory_mib"
    )]
    InitrdTooLarge {
        /// The initrd file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
        /// End of low memory (or the kernel's initrd_addr_max).
        mem_end: u64,
    },
    /// The command line could not be written (should not happen after the length check).
    #[error("cannot write the command line to guest memory")]
    CmdlineWrite,
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write the {what} to guest memory at {addr:#x}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
    },
}

/// The loaded kernel (and initrd), ready for [`write_boot_params`]/[`write_start_info`].
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Format of the kernel file.
    pub format: KernelFormat,
    /// Where the vCPU starts.
    pub entry: EntryPoint,
    /// End of the loaded kernel image.
    pub kernel_end: u64,
    /// The bzImage setup header, if any.
    pub setup_header: Option<setup_header>,
    /// Initrd guest address and size.
    pub initrd: Option<(GuestAddress, u64)>,
}

impl LoadedKernel {
    /// The longest command line the kernel accepts, including the NUL.
    pub fn cmdline_limit(&self) -> usize {
        match &self.setup_header {
            // cmdline_size exists from boot protocol 2.06 and excludes the NUL.
            Some(h) if h.version >= 0x206 && h.cmdline_size > 0 => {
                (h.cmdline_size as usize + 1).min(CMDLINE_MAX_SIZE)
            }
            _ => CMDLINE_MAX_SIZE,
        }
    }
}

/// Whether the file at `path` is a Linux bzImage (the `HdrS` setup header magic), the format
/// every distribution kernel ships in. Linux needs a KVM that runs guest kernels natively.
pub fn is_bzimage(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = [0u8; BZIMAGE_MAGIC_OFFSET + 4];
    match std::fs::File::open(path)?.read_exact(&mut head) {
        Ok(()) => Ok(&head[BZIMAGE_MAGIC_OFFSET..] == BZIMAGE_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Detects the kernel format from its first bytes.
pub fn detect_format(path: &Path, head: &[u8]) -> Result<KernelFormat, BootError> {
    if head.starts_with(b"\x7fELF") {
        let class = head.get(4).copied().unwrap_or(0);
        let machine = head
            .get(18..20)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .unwrap_or(0);
        if class != 2 {
            return Err(BootError::WrongMachine {
                path: path.into(),
                what: format!("ELF class {class} is not 64-bit"),
            });
        }
        if machine != EM_X86_64 {
            return Err(BootError::WrongMachine {
                path: path.into(),
                what: format!("ELF machine {machine}"),
            });
        }
        return Ok(KernelFormat::Elf);
    }
    if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat { path: path.into() })
}

/// Loads the kernel at `path` (and the initrd) into `mem`.
pub fn load_kernel(
    mem: &GuestMemory,
    path: &Path,
    initrd: Option<&Path>,
) -> Result<LoadedKernel, BootError> {
    let io = |source| BootError::Io {
        file: BootFile::Kernel,
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut head = [0u8; 0x210];
    let n = read_up_to(&mut file, &mut head).map_err(io)?;
    let format = detect_format(path, &head[..n])?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let mem_end = mem.last_addr().0 + 1;
    let load_err = |source| match source {
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::InvalidEntryAddress) => {
            BootError::LowEntry { path: path.into() }
        }
        // Reading the image into guest memory fails when it runs past the end of RAM.
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
        | linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
        )
        | linux_loader::loader::Error::MemoryOverflow => BootError::KernelTooLarge {
            path: path.into(),
            mem_end,
        },
        source => BootError::Load {
            path: path.into(),
            source,
        },
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    let (entry, kernel_end, setup_header) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr),
                _ => EntryPoint::Linux64(r.kernel_load),
            };
            (entry, r.kernel_end, None)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let entry =
                EntryPoint::Linux64(GuestAddress(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET));
            (entry, r.kernel_end, r.setup_header)
        }
    };
    let mut loaded = LoadedKernel {
        format,
        entry,
        kernel_end,
        setup_header,
        initrd: None,
    };
    if let Some(initrd) = initrd {
        loaded.initrd = Some(load_initrd(mem, initrd, &loaded)?);
    }
    Ok(loaded)
}

/// Places the initrd page-aligned at the top of low memory (below the kernel's
/// `initrd_addr_max` for bzImages), above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(GuestAddress, u64), BootError> {
    let io = |source| BootError::Io {
        file: BootFile::Initrd,
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let ram: u64 = mem.iter().map(|r| r.len()).sum();
    let mut top = low_memory_end(ram);
    if let Some(h) = &kernel.setup_header {
        if h.initrd_addr_max != 0 {
            top = top.min(u64::from(h.initrd_addr_max) + 1);
        }
    }
    let too_large = || BootError::InitrdTooLarge {
        path: path.into(),
        size,
        kernel_end: kernel.kernel_end,
        mem_end: top,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel.kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    Ok((GuestAddress(addr), size))
}

/// Writes the command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemory, cmdline: &Cmdline) -> Result<(), BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|_| BootError::CmdlineWrite)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Writes `bytes` to guest memory, naming the structure on failure.
fn write_guest(
    mem: &GuestMemory,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| BootError::GuestWrite { what, addr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn elf_header(class: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn detects_formats_and_wrong_machines() {
        let p = Path::new("k");
        assert_eq!(
            detect_format(p, &elf_header(2, 62)).unwrap(),
            KernelFormat::Elf
        );
        let err = detect_format(p, &elf_header(2, 183)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel image k: ELF machine 183; kiln boots 64-bit x86-64 (EM_X86_64 = 62) kernels"
        );
        assert!(matches!(
            detect_format(p, &elf_header(1, 3)),
            Err(BootError::WrongMachine { .. })
        ));
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(p, &bz).unwrap(), KernelFormat::BzImage);
        assert!(matches!(
            detect_format(p, b"#!/bin/sh\n"),
            Err(BootError::UnknownFormat { .. })
        ));
        assert!(matches!(
            detect_format(p, b""),
            Err(BootError::UnknownFormat { .. })
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_or_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let mem = create_guest_memory(16).unwrap();
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: EntryPoint::Linux64(GuestAddress(HIMEM_START)),
            kernel_end: 0x20_0000,
            setup_header: None,
            initrd: None,
        };
        let path = dir.path().join("initrd");
        std::fs::write(&path, vec![7u8; 0x1234]).unwrap();
        let (addr, size) = load_initrd(&mem, &path, &kernel).unwrap();
        assert_eq!(size, 0x1234);
        assert_eq!(addr.0, ((16 << 20) - 0x1234) & !0xfff);
        assert_eq!(mem.read_obj::<u8>(addr).unwrap(), 7);

        std::fs::write(&path, vec![0u8; 15 << 20]).unwrap();
        let err = load_initrd(&mem, &path, &kernel).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("raise VmConfig.memory_mib"));

        let missing = dir.path().join("missing");
        let err = load_initrd(&mem, &missing, &kernel).unwrap_err();
        assert!(err.to_string().starts_with("the initrd "));
    }

    /// A minimal ELF64 x86-64 image with one PT_LOAD of `filesz` bytes at 1 MiB.
    fn elf_with_load(filesz: usize) -> Vec<u8> {
        let mut f = elf_header(2, 62);
        f[6] = 1; // EV_CURRENT
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let mut ph = vec![0u8; 56];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
        ph[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&(filesz as u64).to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&(filesz as u64).to_le_bytes()); // p_memsz
        f.extend_from_slice(&ph);
        f.resize(0x1000 + filesz, 0x90);
        f
    }

    #[test]
    fn kernel_larger_than_memory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.elf");
        std::fs::write(&path, elf_with_load(4 << 20)).unwrap();
        let mem = create_guest_memory(2).unwrap();
        let err = load_kernel(&mem, &path, None).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::KernelTooLarge {
                    mem_end: 0x20_0000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().ends_with("raise VmConfig.memory_mib"));
        // The same image loads, as a 64-bit-entry ELF, when memory is large enough.
        let mem = create_guest_memory(8).unwrap();
        let k = load_kernel(&mem, &path, None).unwrap();
        assert_eq!(k.entry, EntryPoint::Linux64(GuestAddress(0x10_0000)));
        assert_eq!(k.kernel_end, 0x10_0000 + (4 << 20));
    }

    #[test]
    fn cmdline_limit_follows_the_setup_header() {
        let mut h = setup_header {
            version: 0x20f,
            cmdline_size: 255,
            ..Default::default()
        };
        let mut k = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: EntryPoint::Linux64(GuestAddress(0)),
            kernel_end: 0,
            setup_header: Some(h),
            initrd: None,
        };
        assert_eq!(k.cmdline_limit(), 256);
        h.version = 0x205;
        k.setup_header = Some(h);
        assert_eq!(k.cmdline_limit(), CMDLINE_MAX_SIZE);
    }
}
