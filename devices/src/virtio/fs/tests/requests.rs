//! The FUSE requests a guest mounts and uses a share with, and the malformed ones it may send.

use std::os::unix::fs::PermissionsExt;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, ForgetIn, InHeader, InitIn, InitOut, Opcode, SetattrIn,
};
use vm_memory::{Address, ByteValued};

use super::*;
use crate::virtio::fs::FsError;

#[test]
fn config_space_holds_tag_and_one_request_queue() {
    let h = Harness::uninitialized(false);
    assert_eq!(h.dev.device_type(), 26);
    assert_eq!(h.dev.queue_max_sizes(), &[256, 256]);
    assert_ne!(h.dev.features() & crate::virtio::VIRTIO_F_VERSION_1, 0);
    let mut cfg = [0xffu8; 44];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], b"kilnfs");
    assert!(cfg[6..36].iter().all(|&b| b == 0), "tag is NUL padded");
    assert_eq!(&cfg[36..40], &1u32.to_le_bytes());
    assert_eq!(
        &cfg[40..],
        &[0, 0, 0, 0],
        "bytes past the config read as zero"
    );
    let mut tail = [0xffu8; 4];
    h.dev.read_config(u64::MAX - 1, &mut tail);
    assert_eq!(tail, [0; 4]);
}

#[test]
fn bad_tags_and_dirs_are_one_line_errors_naming_the_share() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let long = "t".repeat(37);
    let cases: Vec<(FsError, &str)> = vec![
        (
            VirtioFs::new("", tmp.path(), false).err().expect("empty"),
            "tag is empty",
        ),
        (
            VirtioFs::new(&long, tmp.path(), false).err().expect("long"),
            "37 bytes",
        ),
        (
            VirtioFs::new("a\0b", tmp.path(), false).err().expect("nul"),
            "NUL",
        ),
        (
            VirtioFs::new("t", &tmp.path().join("missing"), false)
                .err()
                .expect("missing"),
            "missing",
        ),
        (
            VirtioFs::new("t", &file, false).err().expect("file"),
            "not a directory",
        ),
    ];
    for (err, needle) in cases {
        let msg = err.to_string();
        assert!(msg.starts_with("share "), "{msg}");
        assert!(msg.contains(needle), "{msg} lacks {needle}");
        assert!(!msg.contains('\n'), "{msg}");
    }
    assert!(
        VirtioFs::new(&"t".repeat(36), tmp.path(), true).is_ok(),
        "36 bytes fit"
    );
}

/// The process umask, read without changing it (umask(2) can only be read by setting it).
fn process_umask() -> String {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find(|l| l.starts_with("Umask:"))
        .expect("Umask line")
        .to_string()
}

#[test]
fn init_answers_fuse_7_x_and_leaves_the_umask_alone() {
    let before = process_umask();
    let mut h = Harness::uninitialized(false);
    let r = h.send(
        Opcode::Init,
        0,
        InitIn {
            major: 7,
            minor: 31,
            max_readahead: 4096,
            flags: 0,
        }
        .as_slice(),
    );
    let out: InitOut = r.obj();
    assert_eq!(out.major, 7);
    assert!(out.minor >= 27, "minor {}", out.minor);
    assert_eq!(r.used_len as usize, 16 + std::mem::size_of::<InitOut>());
    assert_eq!(
        process_umask(),
        before,
        "the passthrough's umask(0) was undone"
    );
}

#[test]
fn lookup_getattr_open_read_release_a_host_file() {
    let mut h = Harness::new(false);
    let entry = h.lookup(ROOT, b"hello.txt").expect("lookup");
    assert_ne!(entry.nodeid, ROOT);
    assert_eq!(entry.attr.size, 20);
    let attr: AttrOut = h.getattr(entry.nodeid).obj();
    assert_eq!(attr.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let fh = h.open(entry.nodeid, libc::O_RDONLY).expect("open");
    assert_eq!(
        h.read(entry.nodeid, fh, 0, 4096).expect("read"),
        b"hello from the host\n"
    );
    assert_eq!(
        h.read(entry.nodeid, fh, 6, 4).expect("read at offset"),
        b"from"
    );
    assert_eq!(
        h.read(entry.nodeid, fh, 100, 10).expect("read past end"),
        b""
    );
    h.release(entry.nodeid, fh).expect("release");
    assert_eq!(
        h.read(entry.nodeid, fh, 0, 10),
        Err(libc::EBADF),
        "released handles are gone"
    );
    assert_eq!(h.lookup(ROOT, b"nope").map(|e| e.nodeid), Err(libc::ENOENT));
}

#[test]
fn create_and_write_land_on_the_host() {
    let mut h = Harness::new(false);
    let (entry, fh) = h
        .create(ROOT, b"new.txt", libc::O_WRONLY | libc::O_CREAT)
        .expect("create");
    assert_eq!(
        h.write(entry.nodeid, fh, 0, b"written by the guest")
            .expect("write"),
        20
    );
    assert_eq!(h.write(entry.nodeid, fh, 8, b"BY").expect("overwrite"), 2);
    h.release(entry.nodeid, fh).expect("release");
    let path = h.share().join("new.txt");
    assert_eq!(
        std::fs::read(&path).expect("host file"),
        b"written BY the guest"
    );
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o600, 0o600, "owner can read and write");
    assert_eq!(
        mode & 0o777 & !0o644,
        0,
        "no bits beyond the requested 0644"
    );
}

#[test]
fn mkdir_readdir_unlink_rmdir() {
    let mut h = Harness::new(false);
    let dir = h.mkdir(ROOT, b"sub").expect("mkdir");
    assert!(h.share().join("sub").is_dir());
    let (file, fh) = h
        .create(dir.nodeid, b"inner", libc::O_RDWR)
        .expect("create in sub");
    h.release(file.nodeid, fh).expect("release");
    assert_eq!(
        h.list(ROOT).expect("readdir root"),
        vec!["hello.txt", "sub"]
    );
    assert_eq!(h.list(dir.nodeid).expect("readdir sub"), vec!["inner"]);
    assert_eq!(h.mkdir(ROOT, b"sub").map(|e| e.nodeid), Err(libc::EEXIST));
    h.unlink(dir.nodeid, b"inner").expect("unlink");
    assert!(!h.share().join("sub/inner").exists());
    let r = h.send(Opcode::Rmdir, ROOT, &cstr(b"sub"));
    assert_eq!(result(&r), Ok(()));
    assert!(!h.share().join("sub").exists());
}

#[test]
fn read_only_share_refuses_every_change_with_erofs() {
    let mut h = Harness::new(true);
    let hello = h
        .lookup(ROOT, b"hello.txt")
        .expect("lookup works read-only");
    let fh = h
        .open(hello.nodeid, libc::O_RDONLY)
        .expect("read-only open");
    assert_eq!(h.read(hello.nodeid, fh, 0, 5).expect("read"), b"hello");
    assert_eq!(h.write(hello.nodeid, fh, 0, b"x"), Err(libc::EROFS));
    assert_eq!(h.open(hello.nodeid, libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(
        h.open(hello.nodeid, libc::O_RDONLY | libc::O_TRUNC),
        Err(libc::EROFS)
    );
    assert_eq!(
        h.create(ROOT, b"new", libc::O_WRONLY).map(|_| ()),
        Err(libc::EROFS)
    );
    assert_eq!(h.mkdir(ROOT, b"d").map(|_| ()), Err(libc::EROFS));
    assert_eq!(h.unlink(ROOT, b"hello.txt"), Err(libc::EROFS));
    let set = SetattrIn {
        valid: 0x8,
        size: 0,
        ..Default::default()
    };
    assert_eq!(
        result(&h.send(Opcode::Setattr, hello.nodeid, set.as_slice())),
        Err(libc::EROFS)
    );
    let sym = [cstr(b"l"), cstr(b"/etc")].concat();
    assert_eq!(
        result(&h.send(Opcode::Symlink, ROOT, &sym)),
        Err(libc::EROFS)
    );
    let ren = [
        0x1u64.to_le_bytes().as_slice(),
        &cstr(b"hello.txt"),
        &cstr(b"moved"),
    ]
    .concat();
    assert_eq!(
        result(&h.send(Opcode::Rename, ROOT, &ren)),
        Err(libc::EROFS)
    );
    assert_eq!(
        std::fs::read(h.share().join("hello.txt")).expect("host"),
        b"hello from the host\n"
    );
    let mut names: Vec<_> = std::fs::read_dir(h.share())
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec!["hello.txt"]);
}

#[test]
fn unknown_opcode_gets_enosys() {
    let mut h = Harness::new(false);
    let r = h.send_opcode(9999, ROOT, &[]);
    assert_eq!(r.error, -libc::ENOSYS);
    assert_eq!(r.used_len, 16);
}

#[test]
fn truncated_header_is_returned_empty() {
    let mut h = Harness::new(false);
    let (used, out) = h.exchange(REQUEST, &[0x55; 20], 64).expect("used entry");
    assert_eq!(used, 0);
    assert!(out.iter().all(|&b| b == 0), "nothing written");
    // The device keeps working afterwards.
    assert!(h.lookup(ROOT, b"hello.txt").is_ok());
}

#[test]
fn bodies_shorter_than_announced_get_einval() {
    let mut h = Harness::new(false);
    // GETATTR without its GetattrIn.
    assert_eq!(h.send(Opcode::Getattr, ROOT, &[]).error, -libc::EINVAL);
    // LOOKUP whose header claims 100 more bytes than the chain holds.
    let hdr = InHeader {
        len: 40 + 100,
        opcode: Opcode::Lookup as u32,
        unique: 77,
        nodeid: ROOT,
        ..Default::default()
    };
    let input = [hdr.as_slice(), b"hello.txt\0"].concat();
    let (used, out) = h.exchange(REQUEST, &input, 64).expect("used");
    let r = parse_reply(used, &out, 77);
    assert_eq!(r.error, -libc::EINVAL);
    // A header length smaller than the header itself.
    let hdr = InHeader {
        len: 8,
        opcode: Opcode::Lookup as u32,
        unique: 78,
        nodeid: ROOT,
        ..Default::default()
    };
    let (used, out) = h
        .exchange(REQUEST, &[hdr.as_slice(), b"x\0"].concat(), 64)
        .expect("used");
    assert_eq!(parse_reply(used, &out, 78).error, -libc::EINVAL);
    // A name without its terminating NUL, and one with an embedded NUL.
    assert_eq!(
        h.send(Opcode::Lookup, ROOT, b"hello.txt").error,
        -libc::EINVAL
    );
    let r = h.send(Opcode::Lookup, ROOT, b"hello.txt\0../outside\0");
    assert_eq!(
        r.obj::<fuse_backend_rs::abi::fuse_abi::EntryOut>()
            .attr
            .size,
        20,
        "the name ends at the first NUL"
    );
    // A huge announced length is refused without allocating it.
    let hdr = InHeader {
        len: u32::MAX,
        opcode: Opcode::Lookup as u32,
        unique: 79,
        nodeid: ROOT,
        ..Default::default()
    };
    let (used, out) = h
        .exchange(REQUEST, &[hdr.as_slice(), b"x\0"].concat(), 64)
        .expect("used");
    assert!(parse_reply(used, &out, 79).error < 0);
}

#[test]
fn chains_the_device_cannot_answer_are_returned_empty() {
    let mut h = Harness::new(false);
    let hdr = InHeader {
        len: 40,
        opcode: Opcode::Statfs as u32,
        unique: 5,
        nodeid: ROOT,
        ..Default::default()
    };
    vm_memory::Bytes::write_slice(&h.mem, hdr.as_slice(), vm_memory::GuestAddress(IN_ADDR))
        .expect("write");
    // No writable descriptor at all.
    assert_eq!(h.chain(REQUEST, &[Desc(IN_ADDR, 40, false)]), Some(0));
    // A reply buffer too small for any answer.
    assert_eq!(
        h.chain(
            REQUEST,
            &[Desc(IN_ADDR, 40, false), Desc(OUT_ADDR, 8, true)]
        ),
        Some(0)
    );
    // Buffers outside guest memory.
    assert_eq!(
        h.chain(
            REQUEST,
            &[Desc(0x4000_0000, 40, false), Desc(OUT_ADDR, 64, true)]
        ),
        Some(0)
    );
    assert_eq!(
        h.chain(
            REQUEST,
            &[
                Desc(IN_ADDR, 40, false),
                Desc(MEM_SIZE as u64 - 8, 64, true)
            ]
        ),
        Some(0)
    );
    // Only writable descriptors: no request to read.
    assert_eq!(h.chain(REQUEST, &[Desc(OUT_ADDR, 64, true)]), Some(0));
    assert!(!h.dev.is_broken());
    assert!(h.lookup(ROOT, b"hello.txt").is_ok(), "still serving");
}

#[test]
fn forget_on_the_hiprio_queue_needs_no_reply() {
    let mut h = Harness::new(false);
    let e = h.lookup(ROOT, b"hello.txt").expect("lookup");
    let hdr = InHeader {
        len: 48,
        opcode: Opcode::Forget as u32,
        unique: 0,
        nodeid: e.nodeid,
        ..Default::default()
    };
    let input = [hdr.as_slice(), ForgetIn { nlookup: 1 }.as_slice()].concat();
    let (used, _) = h.exchange(HIPRIO, &input, 0).expect("used entry");
    assert_eq!(used, 0);
    // The inode is gone after its last lookup was forgotten; a fresh lookup brings it back.
    assert!(h.getattr(e.nodeid).error < 0);
    assert!(h.lookup(ROOT, b"hello.txt").is_ok());
    // A truncated FORGET is dropped, not answered.
    let (used, _) = h.exchange(HIPRIO, hdr.as_slice(), 0).expect("used entry");
    assert_eq!(used, 0);
}

#[test]
fn requests_before_init_and_after_reset_find_no_root() {
    let mut h = Harness::uninitialized(false);
    assert!(h.getattr(ROOT).error < 0, "no root before INIT");
    let mut h = Harness::new(false);
    let e = h.lookup(ROOT, b"hello.txt").expect("lookup");
    assert!(h.dev.reset());
    assert!(!h.dev.is_broken());
    // Not active: a notify does nothing.
    h.dev.process_queue(REQUEST);
    let mem = h.mem.clone();
    let (queues, _) = make_queues(&mem);
    h.dev
        .activate(mem, queues, h.irq.clone(), 0)
        .expect("reactivate");
    assert!(
        h.getattr(e.nodeid).error < 0,
        "the old session's inodes are gone"
    );
}

#[test]
fn activation_needs_both_queues() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut dev = VirtioFs::new("t", tmp.path(), false).expect("device");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
    let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let err = dev.activate(mem, vec![], irq, 0).expect_err("no queues");
    assert!(err.to_string().contains("2 queues"), "{err}");
    dev.process_queue(1);
    dev.process_queue(7);
}

#[test]
fn a_looping_chain_ends_and_is_answered() {
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    let mut h = Harness::new(false);
    let hdr = InHeader {
        len: 40,
        opcode: Opcode::Statfs as u32,
        unique: 9,
        nodeid: ROOT,
        ..Default::default()
    };
    vm_memory::Bytes::write_slice(&h.mem, hdr.as_slice(), vm_memory::GuestAddress(IN_ADDR))
        .expect("write");
    // 0 -> 1 -> 0 -> ...: the chain never ends by itself.
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(IN_ADDR, 40, VRING_DESC_F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            OUT_ADDR,
            4096,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            0,
        )),
    ];
    let used = h.raw_chain(REQUEST, &raw).expect("used entry");
    assert!(used == 0 || used >= 16, "used {used}");
    assert!(h.lookup(ROOT, b"hello.txt").is_ok(), "still serving");
}

#[test]
fn an_avail_index_too_far_ahead_marks_the_device_broken() {
    let mut h = Harness::new(false);
    let (_, avail_addr, used_addr) = h.rings[REQUEST];
    let idx: u16 = vm_memory::Bytes::read_obj(&h.mem, avail_addr.unchecked_add(2)).expect("avail");
    vm_memory::Bytes::write_obj(
        &h.mem,
        idx.wrapping_add(QSIZE + 1),
        avail_addr.unchecked_add(2),
    )
    .expect("avail");
    let used_before: u16 =
        vm_memory::Bytes::read_obj(&h.mem, used_addr.unchecked_add(2)).expect("used");
    h.dev.process_queue(REQUEST);
    let used_after: u16 =
        vm_memory::Bytes::read_obj(&h.mem, used_addr.unchecked_add(2)).expect("used");
    assert_eq!(used_before, used_after, "nothing consumed");
    assert!(h.dev.is_broken());
    assert!(h.dev.reset(), "a reset recovers the device");
    assert!(!h.dev.is_broken());
}
