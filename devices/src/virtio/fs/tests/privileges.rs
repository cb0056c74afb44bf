//! Nothing the guest does leaves a setuid or setgid file on the host, and the modes it asks for
//! are applied exactly, without the process umask.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, FallocateIn, InitIn, MkdirIn, MknodIn, Opcode, SetattrIn,
};
use vm_memory::ByteValued;

use super::*;

const PRIV_BITS: u32 = libc::S_ISUID | libc::S_ISGID;
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_SIZE: u32 = 1 << 3;

fn host_mode(path: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("host metadata")
        .permissions()
        .mode()
}

/// A host file in the share with mode 06755 (setuid root, if kiln runs as root).
fn plant_setuid(h: &Harness, name: &str) -> std::path::PathBuf {
    let path = h.share().join(name);
    std::fs::write(&path, b"#!/bin/sh\nid\n").expect("write host file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o6755)).expect("chmod");
    assert_eq!(host_mode(&path) & 0o7777, 0o6755, "the host kept the bits");
    path
}

fn create_with(h: &mut Harness, name: &[u8], mode: u32, umask: u32) -> Reply {
    let arg = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | mode,
        umask,
        fuse_flags: 0,
    };
    h.send(
        Opcode::Create,
        ROOT,
        &[arg.as_slice(), &cstr(name)].concat(),
    )
}

fn mkdir_with(h: &mut Harness, name: &[u8], mode: u32, umask: u32) -> Reply {
    let arg = MkdirIn { mode, umask };
    h.send(Opcode::Mkdir, ROOT, &[arg.as_slice(), &cstr(name)].concat())
}

fn mknod_with(h: &mut Harness, name: &[u8], mode: u32, umask: u32) -> Reply {
    let arg = MknodIn {
        mode,
        rdev: 0,
        umask,
        padding: 0,
    };
    h.send(Opcode::Mknod, ROOT, &[arg.as_slice(), &cstr(name)].concat())
}

fn setattr(h: &mut Harness, nodeid: u64, set: SetattrIn) -> Reply {
    h.send(Opcode::Setattr, nodeid, set.as_slice())
}

#[test]
fn guest_created_files_directories_and_nodes_never_carry_setuid_or_setgid() {
    let mut h = Harness::new(false);
    let r = create_with(&mut h, b"suid-file", 0o6755, 0);
    assert_eq!(result(&r), Ok(()), "{r:?}");
    let r = mkdir_with(&mut h, b"sgid-dir", 0o3777, 0);
    assert_eq!(result(&r), Ok(()), "{r:?}");
    let r = mknod_with(&mut h, b"suid-node", libc::S_IFREG | 0o6755, 0);
    assert_eq!(result(&r), Ok(()), "{r:?}");
    let r = mknod_with(&mut h, b"sgid-fifo", libc::S_IFIFO | 0o2666, 0);
    assert_eq!(result(&r), Ok(()), "{r:?}");
    for (name, rest) in [
        ("suid-file", 0o755),
        ("sgid-dir", 0o1777),
        ("suid-node", 0o755),
        ("sgid-fifo", 0o666),
    ] {
        let mode = host_mode(&h.share().join(name));
        assert_eq!(mode & PRIV_BITS, 0, "{name} has mode {mode:o} on the host");
        assert_eq!(
            mode & 0o7777,
            rest,
            "{name}: the other bits are the guest's"
        );
    }
    // What the guest is told matches the host.
    let e = h.lookup(ROOT, b"suid-file").expect("lookup");
    assert_eq!(e.attr.mode & PRIV_BITS, 0);
    h.assert_outside_untouched();
}

#[test]
fn a_directory_made_in_a_setgid_directory_does_not_inherit_setgid() {
    let mut h = Harness::new(false);
    let parent = h.share().join("p");
    std::fs::create_dir(&parent).expect("mkdir");
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o2775)).expect("chmod");
    let p = h.lookup(ROOT, b"p").expect("lookup");
    let arg = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let r = h.send(
        Opcode::Mkdir,
        p.nodeid,
        &[arg.as_slice(), &cstr(b"c")].concat(),
    );
    assert_eq!(result(&r), Ok(()), "{r:?}");
    assert_eq!(host_mode(&parent.join("c")) & 0o7777, 0o755);
}

#[test]
fn guest_chmod_cannot_set_setuid_or_setgid() {
    let mut h = Harness::new(false);
    let e = h.lookup(ROOT, b"hello.txt").expect("lookup");
    let r = setattr(
        &mut h,
        e.nodeid,
        SetattrIn {
            valid: FATTR_MODE,
            mode: libc::S_IFREG | 0o6755,
            ..Default::default()
        },
    );
    assert_eq!(result(&r), Ok(()), "{r:?}");
    assert_eq!(host_mode(&h.share().join("hello.txt")) & 0o7777, 0o755);
}

#[test]
fn a_guest_write_clears_setuid_and_setgid() {
    let mut h = Harness::new(false);
    let path = plant_setuid(&h, "tool");
    let e = h.lookup(ROOT, b"tool").expect("lookup");
    let fh = h.open(e.nodeid, libc::O_RDWR).expect("open");
    assert_eq!(
        host_mode(&path) & PRIV_BITS,
        PRIV_BITS,
        "opening alone changes nothing"
    );
    h.write(e.nodeid, fh, 0, b"#!/bin/sh\nsh\n").expect("write");
    assert_eq!(host_mode(&path) & 0o7777, 0o755, "kill-priv on write");
}

#[test]
fn a_guest_truncate_clears_setuid_and_setgid() {
    let mut h = Harness::new(false);
    let path = plant_setuid(&h, "tool");
    let e = h.lookup(ROOT, b"tool").expect("lookup");
    let r = setattr(
        &mut h,
        e.nodeid,
        SetattrIn {
            valid: FATTR_SIZE,
            size: 2,
            ..Default::default()
        },
    );
    assert_eq!(result(&r), Ok(()), "{r:?}");
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), 2);
    assert_eq!(host_mode(&path) & 0o7777, 0o755, "kill-priv on truncate");

    let path = plant_setuid(&h, "tool2");
    let e = h.lookup(ROOT, b"tool2").expect("lookup");
    h.open(e.nodeid, libc::O_RDWR | libc::O_TRUNC)
        .expect("open O_TRUNC");
    assert_eq!(host_mode(&path) & 0o7777, 0o755, "kill-priv on O_TRUNC");

    let path = plant_setuid(&h, "tool3");
    let arg = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let r = h.send(
        Opcode::Create,
        ROOT,
        &[arg.as_slice(), &cstr(b"tool3")].concat(),
    );
    assert_eq!(result(&r), Ok(()), "{r:?}");
    assert_eq!(
        host_mode(&path) & 0o7777,
        0o755,
        "kill-priv on CREATE of an existing file with O_TRUNC; its mode is otherwise kept"
    );
}

#[test]
fn a_guest_fallocate_clears_setuid_and_setgid() {
    let mut h = Harness::new(false);
    let path = plant_setuid(&h, "tool");
    let e = h.lookup(ROOT, b"tool").expect("lookup");
    let fh = h.open(e.nodeid, libc::O_RDWR).expect("open");
    let arg = FallocateIn {
        fh,
        offset: 0,
        length: 1 << 16,
        mode: 0,
        padding: 0,
    };
    let r = h.send(Opcode::Fallocate, e.nodeid, arg.as_slice());
    if r.error == -libc::EOPNOTSUPP {
        return; // the host file system cannot fallocate; nothing changed
    }
    assert_eq!(result(&r), Ok(()), "{r:?}");
    assert_eq!(host_mode(&path) & 0o7777, 0o755, "kill-priv on fallocate");
}

#[test]
fn a_guest_chown_clears_setuid_and_setgid() {
    let mut h = Harness::new(false);
    let path = plant_setuid(&h, "tool");
    let e = h.lookup(ROOT, b"tool").expect("lookup");
    let r = setattr(
        &mut h,
        e.nodeid,
        SetattrIn {
            valid: FATTR_UID,
            // SAFETY: geteuid has no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
            ..Default::default()
        },
    );
    assert_eq!(result(&r), Ok(()), "{r:?}");
    assert_eq!(host_mode(&path) & PRIV_BITS, 0, "kill-priv on chown");
}

#[test]
fn created_files_get_exactly_the_guests_mode_minus_its_umask() {
    let mut h = Harness::new(false);
    // The process umask (0022 under most shells) must not take bits the guest asked for.
    let r = create_with(&mut h, b"f", 0o666, 0o002);
    assert_eq!(result(&r), Ok(()), "{r:?}");
    let r = mkdir_with(&mut h, b"d", 0o777, 0o002);
    assert_eq!(result(&r), Ok(()), "{r:?}");
    let r = mknod_with(&mut h, b"p", libc::S_IFIFO | 0o666, 0o020);
    assert_eq!(result(&r), Ok(()), "{r:?}");
    let r = create_with(&mut h, b"private", 0o600, 0o077);
    assert_eq!(result(&r), Ok(()), "{r:?}");
    for (name, want) in [("f", 0o664), ("d", 0o775), ("p", 0o646), ("private", 0o600)] {
        let mode = host_mode(&h.share().join(name)) & 0o7777;
        assert_eq!(
            mode, want,
            "{name}: {mode:o} on the host, {want:o} asked for"
        );
    }
    let e = h.lookup(ROOT, b"f").expect("lookup");
    assert_eq!(e.attr.mode & 0o7777, 0o664, "the guest sees the host mode");
}

/// The process umask, from /proc (reading it with umask(2) would change it for a moment).
fn process_umask() -> String {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find(|l| l.starts_with("Umask:"))
        .expect("Umask line")
        .to_string()
}

#[test]
fn the_process_umask_never_changes_not_even_during_init() {
    let before = process_umask();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        let before = before.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let now = process_umask();
                if now != before && seen.last() != Some(&now) {
                    seen.push(now);
                }
            }
            seen
        })
    };
    let mut h = Harness::uninitialized(false);
    for _ in 0..300 {
        let r = h.send(
            Opcode::Init,
            0,
            InitIn {
                major: 7,
                minor: 31,
                max_readahead: 0,
                flags: 0,
            }
            .as_slice(),
        );
        assert_eq!(r.error, 0, "INIT: {r:?}");
        h.reactivate();
    }
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("watcher");
    assert!(
        seen.is_empty(),
        "other threads saw the umask change from {before:?} to {seen:?}"
    );
    assert_eq!(process_umask(), before);
}
