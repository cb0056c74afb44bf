//! Nothing the guest sends reaches outside the shared directory. Each test ends with host-side
//! checks: `<tmp>/outside` still holds only the unchanged secret, nothing appeared beside the
//! share, and no reply carried the secret's bytes.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use fuse_backend_rs::abi::fuse_abi::{MknodIn, Opcode, RenameIn, SetattrIn};
use vm_memory::ByteValued;

use super::*;

/// `(st_dev, st_ino)` of a host path, not following a final symlink.
fn host_id(path: &std::path::Path) -> (u64, u64) {
    let m = std::fs::symlink_metadata(path).expect("stat");
    (m.dev(), m.ino())
}

#[test]
fn dotdot_on_the_root_stays_at_the_root() {
    let mut h = Harness::new(false);
    let share_ino = host_id(&h.share()).1;
    let up = h.lookup(ROOT, b"..").expect("lookup ..");
    assert_eq!(up.attr.ino, share_ino, ".. of the root is the root");
    let upup = h.lookup(up.nodeid, b"..").expect("lookup ../..");
    assert_eq!(upup.attr.ino, share_ino);
    assert_eq!(
        h.lookup(up.nodeid, b"outside").map(|_| ()),
        Err(libc::ENOENT)
    );
    assert_eq!(
        h.lookup(upup.nodeid, b"outside").map(|_| ()),
        Err(libc::ENOENT)
    );
    // Down into a subdirectory and back up twice.
    let sub = h.mkdir(ROOT, b"sub").expect("mkdir");
    let back = h.lookup(sub.nodeid, b"..").expect("sub/..");
    assert_eq!(back.attr.ino, share_ino);
    let above = h.lookup(back.nodeid, b"..").expect("sub/../..");
    assert_eq!(
        above.attr.ino, share_ino,
        "the root reached through a subdirectory is still confined"
    );
    assert_eq!(
        h.lookup(above.nodeid, b"outside").map(|_| ()),
        Err(libc::ENOENT)
    );
    // Creating through ".." of the root creates inside the share.
    let (e, fh) = h
        .create(above.nodeid, b"made-via-dotdot", libc::O_WRONLY)
        .expect("create");
    h.release(e.nodeid, fh).expect("release");
    assert!(h.share().join("made-via-dotdot").exists());
    h.assert_outside_untouched();
}

#[test]
fn names_with_a_slash_are_refused() {
    let mut h = Harness::new(false);
    for name in [
        &b"../outside/secret"[..],
        b"../outside",
        b"/etc/passwd",
        b"sub/x",
        b"a/",
    ] {
        assert_eq!(
            h.lookup(ROOT, name).map(|_| ()),
            Err(libc::EINVAL),
            "lookup {name:?}"
        );
    }
    assert_eq!(
        h.create(ROOT, b"../outside/new", libc::O_WRONLY)
            .map(|_| ()),
        Err(libc::EINVAL)
    );
    assert_eq!(
        h.create(ROOT, b"a/b", libc::O_WRONLY).map(|_| ()),
        Err(libc::EINVAL)
    );
    assert_eq!(h.mkdir(ROOT, b"../escaped").map(|_| ()), Err(libc::EINVAL));
    assert_eq!(
        h.create(ROOT, b"..", libc::O_WRONLY).map(|_| ()),
        Err(libc::EINVAL)
    );
    assert_eq!(h.unlink(ROOT, b"../outside/secret"), Err(libc::EINVAL));
    let sym = [cstr(b"../outside/link"), cstr(b"x")].concat();
    assert_eq!(
        result(&h.send(Opcode::Symlink, ROOT, &sym)),
        Err(libc::EINVAL)
    );
    let mk = MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..Default::default()
    };
    let r = h.send(
        Opcode::Mknod,
        ROOT,
        &[mk.as_slice(), &cstr(b"../outside/fifo")].concat(),
    );
    assert_eq!(result(&r), Err(libc::EINVAL));
    let ren = [
        RenameIn { newdir: ROOT }.as_slice(),
        &cstr(b"hello.txt"),
        &cstr(b"../outside/moved"),
    ]
    .concat();
    assert_eq!(
        result(&h.send(Opcode::Rename, ROOT, &ren)),
        Err(libc::EINVAL)
    );
    assert!(h.share().join("hello.txt").exists());
    h.assert_outside_untouched();
}

#[test]
fn symlinks_to_outside_are_never_followed_by_the_host() {
    let mut h = Harness::new(false);
    symlink("/etc", h.share().join("etc")).expect("absolute symlink");
    symlink("../outside", h.share().join("up")).expect("relative symlink");
    symlink(h.outside().join("secret"), h.share().join("secret")).expect("file symlink");
    for (name, target) in [(&b"etc"[..], &b"/etc"[..]), (b"up", b"../outside")] {
        let link = h.lookup(ROOT, name).expect("lookup the link itself");
        assert_eq!(
            link.attr.mode & libc::S_IFMT,
            libc::S_IFLNK,
            "the entry is the link, not its target"
        );
        let r = h.send(Opcode::Readlink, link.nodeid, &[]);
        assert_eq!(
            r.body, target,
            "the guest gets the target text and resolves it itself"
        );
        for inner in [&b"passwd"[..], b"secret", b"."] {
            let r = h.lookup(link.nodeid, inner);
            assert!(
                r.is_err(),
                "lookup {inner:?} through {name:?} must fail, got {r:?}"
            );
        }
        assert!(
            h.open(link.nodeid, libc::O_RDONLY).is_err(),
            "OPEN of a symlink"
        );
        assert!(h.list(link.nodeid).is_err(), "READDIR through a symlink");
        assert!(
            h.create(link.nodeid, b"planted", libc::O_WRONLY).is_err(),
            "CREATE through a symlink"
        );
        assert!(
            h.mkdir(link.nodeid, b"planted-dir").is_err(),
            "MKDIR through a symlink"
        );
    }
    let file_link = h.lookup(ROOT, b"secret").expect("lookup");
    for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY | libc::O_TRUNC] {
        assert!(
            h.open(file_link.nodeid, flags).is_err(),
            "OPEN {flags:#x} of a symlink to a file"
        );
    }
    // Reads with a handle number that was never issued for this inode.
    for fh in 0..4 {
        let r = h.read(file_link.nodeid, fh, 0, 64);
        assert!(r.is_err(), "READ of a symlink with fh {fh}: {r:?}");
    }
    h.assert_outside_untouched();
    assert!(!std::path::Path::new("/etc/planted").exists());
}

#[test]
fn setattr_on_a_symlink_changes_nothing_outside() {
    let mut h = Harness::new(false);
    let secret = h.outside().join("secret");
    let before = std::fs::metadata(&secret).expect("meta");
    symlink(&secret, h.share().join("s")).expect("symlink");
    let link = h.lookup(ROOT, b"s").expect("lookup");
    // MODE and SIZE have no meaning for a symlink itself and are refused; they must not be
    // applied to the target instead.
    for valid in [0x1u32, 0x8] {
        let set = SetattrIn {
            valid,
            mode: 0o777,
            size: 0,
            ..Default::default()
        };
        let r = h.send(Opcode::Setattr, link.nodeid, set.as_slice());
        assert!(r.error < 0, "SETATTR {valid:#x} on a symlink: {r:?}");
    }
    // Explicit times apply to the link itself (like utimensat with AT_SYMLINK_NOFOLLOW).
    let set = SetattrIn {
        valid: 0x10 | 0x20,
        atime: 1,
        mtime: 1,
        ..Default::default()
    };
    let r = h.send(Opcode::Setattr, link.nodeid, set.as_slice());
    if r.error == 0 {
        let link_meta = std::fs::symlink_metadata(h.share().join("s")).expect("link meta");
        assert_eq!(link_meta.mtime(), 1, "the link's own mtime changed");
    }
    let after = std::fs::metadata(&secret).expect("meta");
    assert_eq!(
        after.permissions().mode(),
        before.permissions().mode(),
        "mode of the target"
    );
    assert_eq!(after.mtime(), before.mtime(), "mtime of the target");
    h.assert_outside_untouched();
}

#[test]
fn guest_made_symlinks_point_anywhere_but_lead_nowhere() {
    let mut h = Harness::new(false);
    let outside = h.outside().to_str().expect("utf8").to_string();
    let sym = [cstr(b"esc"), cstr(outside.as_bytes())].concat();
    let r = h.send(Opcode::Symlink, ROOT, &sym);
    let link: fuse_backend_rs::abi::fuse_abi::EntryOut = r.obj();
    assert_eq!(
        std::fs::read_link(h.share().join("esc")).expect("host link"),
        h.outside()
    );
    assert!(h.create(link.nodeid, b"pwned", libc::O_WRONLY).is_err());
    assert!(h.lookup(link.nodeid, b"secret").is_err());
    assert!(h.open(link.nodeid, libc::O_RDONLY).is_err());
    // A hard link to the symlink is a second link to the symlink, not to its target.
    let r = h.send(
        Opcode::Link,
        ROOT,
        &[link.nodeid.to_le_bytes().as_slice(), &cstr(b"esc2")].concat(),
    );
    if r.error == 0 {
        assert!(std::fs::symlink_metadata(h.share().join("esc2"))
            .expect("meta")
            .file_type()
            .is_symlink());
    }
    h.assert_outside_untouched();
}

#[test]
fn a_name_swapped_for_a_symlink_after_lookup_is_not_followed() {
    let mut h = Harness::new(false);
    std::fs::write(h.share().join("victim"), b"original").expect("victim");
    let victim = h.lookup(ROOT, b"victim").expect("lookup");
    // The host (or another guest process racing through it) swaps the name for a symlink to
    // the secret between LOOKUP and OPEN.
    symlink(h.outside().join("secret"), h.share().join("swap")).expect("symlink");
    std::fs::rename(h.share().join("swap"), h.share().join("victim")).expect("rename over");
    let fh = h
        .open(victim.nodeid, libc::O_RDWR | libc::O_TRUNC)
        .expect("opens the looked-up inode");
    let data = h.read(victim.nodeid, fh, 0, 64).expect("read");
    assert!(
        data.is_empty(),
        "reads the original (truncated) file, not the secret"
    );
    h.write(victim.nodeid, fh, 0, b"pwned").expect("write");
    h.release(victim.nodeid, fh).expect("release");
    // A fresh LOOKUP now sees the symlink, which cannot be opened.
    let again = h.lookup(ROOT, b"victim").expect("lookup");
    assert_eq!(again.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(h.open(again.nodeid, libc::O_RDWR).is_err());
    h.assert_outside_untouched();
}

#[test]
fn forged_inode_and_handle_numbers_reach_nothing() {
    let mut h = Harness::new(false);
    let hello = h.lookup(ROOT, b"hello.txt").expect("lookup");
    for forged in [0u64, 2, 0xdead_beef, u64::MAX, hello.nodeid + 1000] {
        if forged == hello.nodeid {
            continue;
        }
        assert!(h.getattr(forged).error < 0, "GETATTR {forged:#x}");
        assert!(
            h.lookup(forged, b"secret").is_err(),
            "LOOKUP under {forged:#x}"
        );
        assert!(h.open(forged, libc::O_RDONLY).is_err(), "OPEN {forged:#x}");
        assert!(
            h.create(forged, b"x", libc::O_WRONLY).is_err(),
            "CREATE under {forged:#x}"
        );
        assert!(h.list(forged).is_err(), "READDIR {forged:#x}");
        let r = h.send(
            Opcode::Link,
            ROOT,
            &[forged.to_le_bytes().as_slice(), &cstr(b"linked")].concat(),
        );
        assert!(r.error < 0, "LINK of {forged:#x}");
    }
    // Handles: never issued, or issued for another inode.
    let fh = h.open(hello.nodeid, libc::O_RDONLY).expect("open");
    assert!(
        h.read(hello.nodeid, fh + 7, 0, 16).is_err(),
        "unissued handle"
    );
    let dir = h.mkdir(ROOT, b"d").expect("mkdir");
    assert!(
        h.read(dir.nodeid, fh, 0, 16).is_err(),
        "handle of another inode"
    );
    assert!(
        h.write(dir.nodeid, fh, 0, b"x").is_err(),
        "write with another inode's handle"
    );
    assert!(
        h.release(dir.nodeid, fh).is_err(),
        "release with another inode's handle"
    );
    assert_eq!(
        h.read(hello.nodeid, fh, 0, 5)
            .expect("own handle still works"),
        b"hello"
    );
    let mut names: Vec<_> = std::fs::read_dir(h.share())
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec!["d", "hello.txt"]);
    h.assert_outside_untouched();
}

#[test]
fn device_nodes_cannot_be_created() {
    let mut h = Harness::new(false);
    for (kind, name) in [(libc::S_IFCHR, &b"null"[..]), (libc::S_IFBLK, b"disk")] {
        // /dev/null (1:3) and /dev/sda (8:0).
        let rdev = if kind == libc::S_IFCHR {
            (1 << 8) | 3
        } else {
            8 << 8
        };
        let mk = MknodIn {
            mode: kind | 0o666,
            rdev,
            umask: 0,
            padding: 0,
        };
        let r = h.send(Opcode::Mknod, ROOT, &[mk.as_slice(), &cstr(name)].concat());
        assert_eq!(result(&r), Err(libc::EPERM));
    }
    let mk = MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..Default::default()
    };
    let r = h.send(
        Opcode::Mknod,
        ROOT,
        &[mk.as_slice(), &cstr(b"fifo")].concat(),
    );
    assert_eq!(result(&r), Ok(()), "FIFOs are fine");
    let fifo = h.lookup(ROOT, b"fifo").expect("lookup");
    assert!(
        h.open(fifo.nodeid, libc::O_RDONLY | libc::O_NONBLOCK)
            .is_err(),
        "the host never opens a FIFO for the guest"
    );
    assert!(!h.share().join("null").exists() && !h.share().join("disk").exists());
    h.assert_outside_untouched();
}

#[test]
fn no_reply_ever_carries_outside_bytes() {
    let mut h = Harness::new(false);
    symlink(h.outside().join("secret"), h.share().join("s")).expect("symlink");
    let mut replies = Vec::new();
    for name in [&b".."[..], b"s", b"../outside/secret", b"secret"] {
        replies.push(h.send(Opcode::Lookup, ROOT, &cstr(name)));
    }
    if let Ok(link) = h.lookup(ROOT, b"s") {
        for fh in 0..3 {
            let arg = fuse_backend_rs::abi::fuse_abi::ReadIn {
                fh,
                size: 64,
                ..Default::default()
            };
            replies.push(h.send(Opcode::Read, link.nodeid, arg.as_slice()));
        }
    }
    for r in &replies {
        assert_no_secret(r);
    }
    h.assert_outside_untouched();
}

#[test]
#[should_panic(expected = "something was created outside the share")]
fn the_outside_check_notices_a_planted_file() {
    let h = Harness::new(false);
    std::fs::write(h.outside().join("planted"), b"x").expect("plant");
    h.assert_outside_untouched();
}
