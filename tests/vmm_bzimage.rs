//! The bzImage path of the 64-bit Linux boot protocol, end to end on /dev/kvm: a synthetic
//! bzImage (a real setup header in front of the boot64_info guest linked as a flat binary at
//! 1 MiB + 0x200) is loaded by kiln's VMM, entered at its 64-bit entry point, and prints what it
//! finds in `boot_params`: the header kiln kept from the image, the command line, e820 and the
//! initrd below `initrd_addr_max`.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln::vmm::{ExitReason, Vm, VmConfig};

/// Setup sectors after the boot sector: the protected-mode kernel starts at (1 + 1) * 512.
const SETUP_SECTS: u8 = 1;
/// The bzImage's `initrd_addr_max`: kiln must keep the initrd below it.
const INITRD_ADDR_MAX: u32 = 0x1ff_ffff;

fn tool(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e} (install binutils)"))?;
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Builds the synthetic bzImage in `dir`.
fn build_bzimage(dir: &Path) -> Result<PathBuf, String> {
    let guests = common::guests_dir();
    let obj = dir.join("boot64_info.o");
    let flat = dir.join("boot64_info.bin");
    tool(
        Command::new("as")
            .arg("--64")
            .arg("-I")
            .arg(&guests)
            .arg("-o")
            .arg(&obj)
            .arg(guests.join("boot64_info.S")),
    )?;
    tool(
        Command::new("ld")
            .args(["-static", "-nostdlib", "-z", "noexecstack", "-T"])
            .arg(guests.join("bzimage.ld"))
            .arg("-o")
            .arg(&flat)
            .arg(&obj),
    )?;
    let code = std::fs::read(&flat).map_err(|e| e.to_string())?;
    let setup_len = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut image = vec![0u8; setup_len + 0x200];
    image[0x1f1] = SETUP_SECTS;
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes()); // boot_flag
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    image[0x211] = 0x01; // loadflags: LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    image[0x22c..0x230].copy_from_slice(&INITRD_ADDR_MAX.to_le_bytes());
    image[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    image[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    image.extend_from_slice(&code);
    let path = dir.join("bzImage");
    std::fs::write(&path, image).map_err(|e| e.to_string())?;
    Ok(path)
}

#[test]
fn bzimage_enters_at_the_64bit_entry_with_boot_params() {
    or_skip!(common::kvm_usable());
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = or_skip!(build_bzimage(dir.path()));
    let initrd = dir.path().join("initrd");
    let mut contents = b"BZINITRD".to_vec();
    contents.resize(0x3000, b'.');
    std::fs::write(&initrd, &contents).expect("initrd");

    let mut vm = Vm::start(
        VmConfig::new(&kernel)
            .initrd(&initrd)
            .cmdline("from the bzimage test")
            .memory_mib(64),
    )
    .expect("start");
    assert_eq!(vm.boot_info().protocol, "linux64");
    assert_eq!(vm.boot_info().entry, 0x10_0200);
    let exit = vm.wait(Duration::from_secs(10));
    let text = vm.console().text();
    assert_eq!(exit, ExitReason::ExitPort(0), "console:\n{text}");
    // Top of low memory is 64 MiB, but the image allows the initrd only below 32 MiB.
    let initrd_addr = (u64::from(INITRD_ADDR_MAX) + 1 - 0x3000) & !0xfff;
    let expected = format!(
        "BOOT64 hdr=0x53726448\n\
         cmdline=console=ttyS0 reboot=k panic=-1 from the bzimage test\n\
         e820 entries=3\n\
         e820 addr=0x0 size=0x9fc00 type=1\n\
         e820 addr=0xe0000 size=0x20000 type=2\n\
         e820 addr=0x100000 size=0x3f00000 type=1\n\
         initrd addr={initrd_addr:#x} size=0x3000 first=BZINITRD\n\
         rsdp=0xe0000\n\
         BOOT64 done\n"
    );
    assert_eq!(text, expected);
}
