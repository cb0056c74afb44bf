//! A minimal virtio-fs driver over queues in fake guest memory, and the tests that use it.

mod budget;
mod confinement;
mod privileges;
mod requests;

use std::path::PathBuf;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, GetattrIn, InHeader, InitIn, MkdirIn, Opcode, OpenIn, OpenOut, OutHeader,
    ReadIn, ReleaseIn, WriteIn, WriteOut, ROOT_ID,
};
use tempfile::TempDir;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub(super) const VRING_DESC_F_NEXT: u16 = 1;
pub(super) const VRING_DESC_F_WRITE: u16 = 2;

use super::VirtioFs;
use crate::virtio::{GuestMem, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_VRING};

const MEM_SIZE: usize = 0x100_0000;
const RING_ADDR: [u64; 2] = [0x0, 0x1_0000];
const QSIZE: u16 = 256;
/// Where the driver puts the request (device-readable) and the reply (device-writable).
pub(super) const IN_ADDR: u64 = 0x10_0000;
pub(super) const OUT_ADDR: u64 = 0x20_0000;
pub(super) const OUT_LEN: u32 = 0x2_0000;
/// Bytes of the host file outside the share; no reply may ever carry them.
pub(super) const SECRET: &[u8] = b"KILN-OUTSIDE-SECRET";
pub(super) const HIPRIO: usize = 0;
pub(super) const REQUEST: usize = 1;

/// One descriptor of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
pub(super) struct Desc(pub u64, pub u32, pub bool);

/// What came back for one request.
#[derive(Debug)]
pub(super) struct Reply {
    pub used_len: u32,
    pub error: i32,
    pub body: Vec<u8>,
}

impl Reply {
    /// The reply body as a FUSE struct; panics (fails the test) on an error reply.
    pub fn obj<T: ByteValued>(&self) -> T {
        assert_eq!(self.error, 0, "unexpected error reply {self:?}");
        T::from_slice(&self.body[..std::mem::size_of::<T>()])
            .copied()
            .expect("reply too short")
    }
}

/// A device with a driver in front of it and a temporary host tree behind it:
/// `<tmp>/share` is shared, `<tmp>/outside/secret` must stay out of reach.
pub(super) struct Harness {
    pub mem: GuestMem,
    pub dev: VirtioFs,
    pub irq: Interrupt,
    pub tmp: TempDir,
    /// Per queue: descriptor table, avail ring and used ring addresses.
    pub rings: Vec<(GuestAddress, GuestAddress, GuestAddress)>,
    unique: u64,
}

impl Harness {
    /// A device that has been activated and has answered FUSE_INIT.
    pub fn new(read_only: bool) -> Self {
        let mut h = Self::uninitialized(read_only);
        let init = h.send(
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
        assert_eq!(init.error, 0, "INIT failed: {init:?}");
        h
    }

    /// A device that has been activated but has seen no request.
    pub fn uninitialized(read_only: bool) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("share")).expect("mkdir share");
        std::fs::create_dir(tmp.path().join("outside")).expect("mkdir outside");
        std::fs::write(tmp.path().join("outside/secret"), SECRET).expect("write secret");
        std::fs::write(tmp.path().join("share/hello.txt"), b"hello from the host\n")
            .expect("write hello");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("guest memory");
        let mut dev =
            VirtioFs::new("kilnfs", &tmp.path().join("share"), read_only).expect("device");
        let (queues, rings) = make_queues(&mem);
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        dev.activate(mem.clone(), queues, irq.clone(), dev.features())
            .expect("activate");
        Self {
            mem,
            dev,
            irq,
            tmp,
            rings,
            unique: 0,
        }
    }

    /// Resets the device and activates it again on fresh queues (a new driver, before INIT).
    pub fn reactivate(&mut self) {
        assert!(self.dev.reset(), "reset");
        let (queues, rings) = make_queues(&self.mem);
        self.rings = rings;
        self.dev
            .activate(
                self.mem.clone(),
                queues,
                self.irq.clone(),
                self.dev.features(),
            )
            .expect("reactivate");
    }

    pub fn share(&self) -> PathBuf {
        self.tmp.path().join("share")
    }

    pub fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    /// Puts one chain on `queue`, notifies, and returns the used length, or None when the
    /// device put nothing in the used ring.
    pub fn chain(&mut self, queue: usize, descs: &[Desc]) -> Option<u32> {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut flags = if d.2 { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(d.0, d.1, flags, i as u16 + 1))
            })
            .collect();
        self.raw_chain(queue, &raw)
    }

    /// [`Harness::chain`] with descriptors exactly as given (flags and `next` included).
    pub fn raw_chain(&mut self, queue: usize, raw: &[RawDescriptor]) -> Option<u32> {
        // The rings were laid out by MockSplitQueue at activation; creating another mock would
        // zero them, so chains are added here by hand, the way a driver does.
        let (table, avail_addr, used_addr) = self.rings[queue];
        for (i, d) in raw.iter().enumerate() {
            self.mem
                .write_obj(*d, table.unchecked_add(16 * i as u64))
                .expect("descriptor");
        }
        let avail: u16 = self
            .mem
            .read_obj(avail_addr.unchecked_add(2))
            .expect("avail idx");
        let slot = avail_addr.unchecked_add(4 + 2 * u64::from(avail % QSIZE));
        self.mem.write_obj(0u16, slot).expect("avail entry");
        self.mem
            .write_obj(avail.wrapping_add(1), avail_addr.unchecked_add(2))
            .expect("avail idx");
        let before: u16 = self
            .mem
            .read_obj(used_addr.unchecked_add(2))
            .expect("used idx");
        self.irq.ack(u32::MAX);
        self.dev.process_queue(queue);
        let after: u16 = self
            .mem
            .read_obj(used_addr.unchecked_add(2))
            .expect("used idx");
        if after == before {
            return None;
        }
        assert_eq!(after, before.wrapping_add(1), "one chain, one used entry");
        assert_ne!(
            self.irq.status() & VIRTIO_MMIO_INT_VRING,
            0,
            "used buffer without interrupt"
        );
        let slot = u64::from(before % QSIZE);
        let elem = used_addr.unchecked_add(4 + 8 * slot);
        let id: u32 = self.mem.read_obj(elem).expect("used id");
        assert_eq!(id, 0, "used entry names the chain's head");
        Some(self.mem.read_obj(elem.unchecked_add(4)).expect("used len"))
    }

    /// Sends `input` as one readable buffer followed by one writable buffer of `out_len`
    /// bytes; returns the used length and the writable buffer's contents.
    pub fn exchange(&mut self, queue: usize, input: &[u8], out_len: u32) -> Option<(u32, Vec<u8>)> {
        self.mem
            .write_slice(input, GuestAddress(IN_ADDR))
            .expect("write request");
        let zeros = vec![0u8; out_len as usize];
        self.mem
            .write_slice(&zeros, GuestAddress(OUT_ADDR))
            .expect("clear reply");
        let mut descs = vec![Desc(IN_ADDR, input.len() as u32, false)];
        if out_len > 0 {
            descs.push(Desc(OUT_ADDR, out_len, true));
        }
        let used = self.chain(queue, &descs)?;
        let mut out = vec![0u8; out_len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(OUT_ADDR))
            .expect("read reply");
        Some((used, out))
    }

    /// Sends one FUSE request on the request queue and parses the reply.
    pub fn send(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> Reply {
        self.send_opcode(opcode as u32, nodeid, body)
    }

    /// [`Harness::send`] with a raw opcode number.
    pub fn send_opcode(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Reply {
        self.unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            // SAFETY: geteuid/getegid have no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getegid() },
            pid: 1,
            padding: 0,
        };
        let mut input = header.as_slice().to_vec();
        input.extend_from_slice(body);
        let (used_len, out) = self
            .exchange(REQUEST, &input, OUT_LEN)
            .expect("no used entry");
        parse_reply(used_len, &out, self.unique)
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<EntryOut, i32> {
        let r = self.send(Opcode::Lookup, parent, &cstr(name));
        result(&r).map(|_| r.obj())
    }

    pub fn open(&mut self, nodeid: u64, flags: i32) -> Result<u64, i32> {
        let r = self.send(
            Opcode::Open,
            nodeid,
            OpenIn {
                flags: flags as u32,
                fuse_flags: 0,
            }
            .as_slice(),
        );
        result(&r).map(|_| r.obj::<OpenOut>().fh)
    }

    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let arg = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let r = self.send(Opcode::Read, nodeid, arg.as_slice());
        result(&r).map(|_| r.body.clone())
    }

    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let arg = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        let r = self.send(Opcode::Write, nodeid, &[arg.as_slice(), data].concat());
        result(&r).map(|_| r.obj::<WriteOut>().size)
    }

    pub fn create(&mut self, parent: u64, name: &[u8], flags: i32) -> Result<(EntryOut, u64), i32> {
        let arg = CreateIn {
            flags: flags as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0o022,
            fuse_flags: 0,
        };
        let r = self.send(
            Opcode::Create,
            parent,
            &[arg.as_slice(), &cstr(name)].concat(),
        );
        result(&r)?;
        let entry: EntryOut = r.obj();
        let open = OpenOut::from_slice(
            &r.body[std::mem::size_of::<EntryOut>()..][..std::mem::size_of::<OpenOut>()],
        )
        .copied()
        .expect("open out");
        Ok((entry, open.fh))
    }

    pub fn mkdir(&mut self, parent: u64, name: &[u8]) -> Result<EntryOut, i32> {
        let arg = MkdirIn {
            mode: 0o755,
            umask: 0o022,
        };
        let r = self.send(
            Opcode::Mkdir,
            parent,
            &[arg.as_slice(), &cstr(name)].concat(),
        );
        result(&r).map(|_| r.obj())
    }

    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> Result<(), i32> {
        let r = self.send(Opcode::Unlink, parent, &cstr(name));
        result(&r)
    }

    pub fn release(&mut self, nodeid: u64, fh: u64) -> Result<(), i32> {
        let r = self.send(
            Opcode::Release,
            nodeid,
            ReleaseIn {
                fh,
                ..Default::default()
            }
            .as_slice(),
        );
        result(&r)
    }

    pub fn getattr(&mut self, nodeid: u64) -> Reply {
        self.send(Opcode::Getattr, nodeid, GetattrIn::default().as_slice())
    }

    /// Names in the directory `nodeid`, via OPENDIR + READDIR + RELEASEDIR.
    pub fn list(&mut self, nodeid: u64) -> Result<Vec<String>, i32> {
        let r = self.send(
            Opcode::Opendir,
            nodeid,
            OpenIn {
                flags: libc::O_RDONLY as u32,
                fuse_flags: 0,
            }
            .as_slice(),
        );
        result(&r)?;
        let fh = r.obj::<OpenOut>().fh;
        let r = self.send(
            Opcode::Readdir,
            nodeid,
            ReadIn {
                fh,
                size: 4096,
                ..Default::default()
            }
            .as_slice(),
        );
        result(&r)?;
        let names = parse_dirents(&r.body);
        let r = self.send(
            Opcode::Releasedir,
            nodeid,
            ReleaseIn {
                fh,
                ..Default::default()
            }
            .as_slice(),
        );
        result(&r)?;
        Ok(names)
    }

    /// Asserts that the directory outside the share holds exactly the secret, unchanged, and
    /// that no reply so far can have leaked it (callers check bodies with [`assert_no_secret`]).
    pub fn assert_outside_untouched(&self) {
        let entries: Vec<_> = std::fs::read_dir(self.outside())
            .expect("read outside")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            entries,
            vec![std::ffi::OsString::from("secret")],
            "something was created outside the share"
        );
        assert_eq!(
            std::fs::read(self.outside().join("secret")).expect("secret"),
            SECRET
        );
        let parent: Vec<_> = std::fs::read_dir(self.tmp.path())
            .expect("read tmp")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        let mut parent = parent;
        parent.sort();
        assert_eq!(
            parent,
            vec!["outside", "share"],
            "something was created beside the share"
        );
    }
}

/// Fresh queues at [`RING_ADDR`] (zeroed rings) and their ring addresses.
#[allow(clippy::type_complexity)]
pub(super) fn make_queues(
    mem: &GuestMem,
) -> (Vec<Queue>, Vec<(GuestAddress, GuestAddress, GuestAddress)>) {
    RING_ADDR
        .iter()
        .map(|&a| {
            let mock = MockSplitQueue::create(mem, GuestAddress(a), QSIZE);
            let queue = mock.create_queue::<Queue>().expect("queue");
            (
                queue,
                (mock.desc_table_addr(), mock.avail_addr(), mock.used_addr()),
            )
        })
        .unzip()
}

pub(super) fn assert_no_secret(r: &Reply) {
    assert!(
        !r.body.windows(SECRET.len()).any(|w| w == SECRET),
        "a reply carried bytes from outside the share"
    );
}

pub(super) fn cstr(name: &[u8]) -> Vec<u8> {
    let mut v = name.to_vec();
    v.push(0);
    v
}

pub(super) fn result(r: &Reply) -> Result<(), i32> {
    match r.error {
        0 => Ok(()),
        e => Err(-e),
    }
}

pub(super) fn parse_reply(used_len: u32, out: &[u8], unique: u64) -> Reply {
    let hdr = OutHeader::from_slice(&out[..std::mem::size_of::<OutHeader>()])
        .copied()
        .expect("out header");
    assert_eq!(hdr.unique, unique, "reply answers another request");
    assert_eq!(hdr.len, used_len, "used length and reply length differ");
    Reply {
        used_len,
        error: hdr.error,
        body: out[std::mem::size_of::<OutHeader>()..used_len as usize].to_vec(),
    }
}

fn parse_dirents(mut buf: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    while buf.len() >= 24 {
        let namelen = u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes")) as usize;
        let name = &buf[24..24 + namelen];
        names.push(String::from_utf8_lossy(name).into_owned());
        let rec = (24 + namelen + 7) & !7;
        buf = &buf[rec.min(buf.len())..];
    }
    names.sort();
    names
}

pub(super) const ROOT: u64 = ROOT_ID;
