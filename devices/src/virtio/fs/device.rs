//! The virtio-fs device: config space, queues, and one FUSE request per descriptor chain.

use std::io::Write;
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::confine::ConfinedFs;
use super::{FsError, TAG_MAX_LEN};
use crate::virtio::{
    device_type, pending_chains, ActivateError, GuestMem, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Queue 0 is the high-priority queue (FORGET, INTERRUPT), queue 1 the one request queue.
const NUM_QUEUES: usize = 2;
/// Request queues announced in the config space (`num_request_queues`).
const NUM_REQUEST_QUEUES: u32 = 1;
/// Queue size; the driver may choose less. 256 matches what one request queue can keep busy.
const QUEUE_SIZE: u16 = 256;
/// `tag[36]` followed by `le32 num_request_queues` (virtio 1.2 §5.11.4).
const CONFIG_LEN: usize = TAG_MAX_LEN + 4;
/// Most requests one call into the device serves per queue. A driver that refills the queue
/// from another vCPU as fast as the device empties it would otherwise keep the event loop (and
/// every other device of the VM, and teardown) waiting; past the budget the device kicks itself
/// and carries on at the next turn of the loop.
pub const CHAINS_PER_EVENT: usize = 32;

/// What happened to one descriptor chain.
enum Outcome {
    /// Put it in the used ring with this many bytes written.
    Used(u32),
    /// The server panicked; the chain is returned empty and the device is marked broken.
    Broken,
}

/// A virtio-fs device serving one host directory under a mount tag.
pub struct VirtioFs {
    tag: String,
    config: [u8; CONFIG_LEN],
    fs: Arc<ConfinedFs>,
    server: Server<Arc<ConfinedFs>>,
    active: Option<Active>,
    broken: bool,
    /// Written when a queue still had requests after [`CHAINS_PER_EVENT`]; watched as a host
    /// fd, so the event loop comes back for the rest after serving everything else.
    kick: EventFd,
    /// FUSE requests served since the driver activated the device: a session has begun (a
    /// snapshot cannot carry it, see [`VirtioDevice::snapshot_blocker`]).
    served: u64,
}

struct Active {
    mem: GuestMem,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

impl VirtioFs {
    /// A device sharing `shared_dir` as mount tag `tag`, refusing all writes when `read_only`.
    pub fn new(tag: &str, shared_dir: &Path, read_only: bool) -> Result<Self, FsError> {
        if tag.is_empty() {
            return Err(FsError::EmptyTag);
        }
        if tag.len() > TAG_MAX_LEN {
            return Err(FsError::TagTooLong {
                tag: tag.to_string(),
                len: tag.len(),
            });
        }
        if tag.contains('\0') {
            return Err(FsError::TagHasNul {
                tag: tag.to_string(),
            });
        }
        let dir_error = |source| FsError::DirUnusable {
            tag: tag.to_string(),
            dir: shared_dir.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(shared_dir).map_err(dir_error)?;
        if !meta.is_dir() {
            return Err(FsError::NotADir {
                tag: tag.to_string(),
                dir: shared_dir.to_path_buf(),
            });
        }
        // Resolve symlinks in the path once, here: the server then holds the directory by fd.
        let root = shared_dir.canonicalize().map_err(dir_error)?;
        let root_str = root.to_str().ok_or_else(|| FsError::NonUtf8Dir {
            tag: tag.to_string(),
            dir: shared_dir.to_path_buf(),
        })?;
        let cfg = Config {
            root_dir: root_str.to_string(),
            cache_policy: CachePolicy::Auto,
            writeback: false,
            xattr: false,
            do_import: true,
            ..Config::default()
        };
        let passthrough = PassthroughFs::<()>::new(cfg).map_err(|source| FsError::Backend {
            tag: tag.to_string(),
            dir: shared_dir.to_path_buf(),
            source,
        })?;
        let fs = Arc::new(ConfinedFs::new(passthrough, read_only));
        let kick = EventFd::new(EFD_NONBLOCK).map_err(|source| FsError::Backend {
            tag: tag.to_string(),
            dir: shared_dir.to_path_buf(),
            source,
        })?;

        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_MAX_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());

        Ok(Self {
            tag: tag.to_string(),
            config,
            server: Server::new(Arc::clone(&fs)),
            fs,
            active: None,
            broken: false,
            kick,
            served: 0,
        })
    }

    /// The mount tag the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|pos| usize::try_from(pos).ok())
                .and_then(|pos| self.config.get(pos).copied())
                .unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::BadQueue(format!(
                "virtio-fs {}: expected {NUM_QUEUES} queues (hiprio + 1 request queue), got {}",
                self.tag,
                queues.len()
            )));
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if self.broken {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            tracing::debug!(tag = %self.tag, index, "virtio-fs: notify for a queue that does not exist");
            return;
        };
        let mem = &active.mem;
        if !queue.is_valid(mem) {
            tracing::debug!(tag = %self.tag, index, "virtio-fs: notify for a queue that is not set up");
            return;
        }
        // More new entries than the ring holds: the driver's index is corrupt, and popping
        // would only ever fail. Ask for a reset instead of silently ignoring the queue.
        if let Err(e) = pending_chains(queue, mem) {
            tracing::warn!(tag = %self.tag, "virtio-fs: {e}; the device needs a reset");
            self.broken = true;
            return;
        }
        let mut used_any = false;
        let mut served = 0;
        while served < CHAINS_PER_EVENT {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            served += 1;
            self.served += 1;
            let head = chain.head_index();
            let len = match handle_chain(&self.server, mem, chain) {
                Outcome::Used(len) => len,
                Outcome::Broken => {
                    self.broken = true;
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!(tag = %self.tag, "virtio-fs: cannot add a used entry: {e}");
                self.broken = true;
            }
            used_any = true;
            if self.broken {
                break;
            }
        }
        if used_any {
            active.interrupt.signal_used_queue();
        }
        if served == CHAINS_PER_EVENT && !self.broken {
            if let Err(e) = self.kick.write(1) {
                tracing::warn!(tag = %self.tag, "virtio-fs: cannot schedule the rest of the queue: {e}");
            }
        }
    }

    fn host_fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.kick.as_raw_fd(), EventSet::IN)]
    }

    fn process_host_event(&mut self, fd: RawFd, _events: EventSet) {
        if fd != self.kick.as_raw_fd() {
            return;
        }
        // Drain first: a queue that fills the budget again below kicks anew.
        let _ = self.kick.read();
        for index in 0..NUM_QUEUES {
            self.process_queue(index);
        }
    }

    fn stop(&mut self) {
        // The transport refuses notifications until a reset: nothing may reach the queues.
        self.active = None;
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        // A new driver starts a new FUSE session with INIT: forget the old one's inodes and
        // handles so that nothing it held stays open on the host.
        self.fs.destroy();
        self.broken = false;
        self.served = 0;
        true
    }

    fn is_broken(&self) -> bool {
        self.broken
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter())
            .map(|q| (q.next_avail(), q.next_used()))
            .collect()
    }

    fn snapshot_blocker(&self) -> Option<String> {
        (self.served > 0).then(|| {
            format!(
                "virtio-fs `{}` has served {} FUSE requests (the share is mounted); snapshots are taken before shares are mounted",
                self.tag, self.served
            )
        })
    }
}

/// Runs the FUSE request in `chain` and returns how many bytes of reply it wrote.
fn handle_chain<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
) -> Outcome {
    let header = match Reader::from_descriptor_chain(mem, chain.clone())
        .map_err(|e| e.to_string())
        .and_then(|mut r| r.read_obj::<InHeader>().map_err(|e| e.to_string()))
    {
        Ok(header) => header,
        Err(e) => {
            // Without a complete header there is no `unique` to answer to.
            tracing::debug!("virtio-fs: dropping a request without a FUSE header: {e}");
            return Outcome::Used(0);
        }
    };
    let reader = Reader::from_descriptor_chain(mem, chain.clone());
    let writer = VirtioFsWriter::new(mem, chain.clone());
    let (reader, writer) = match (reader, writer) {
        (Ok(r), Ok(w)) => (r, Writer::from(w)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!("virtio-fs: unusable descriptor chain: {e}");
            return Outcome::Used(0);
        }
    };
    // fuse-backend-rs is hardened against hostile clients, but it is a large body of code with
    // debug assertions; a panic in it must not take the VMM down.
    let result = catch_unwind(AssertUnwindSafe(|| {
        server.handle_message(reader, writer, None, None)
    }));
    match result {
        Ok(Ok(written)) => Outcome::Used(u32::try_from(written).unwrap_or(0)),
        Ok(Err(e)) => {
            tracing::debug!(opcode = header.opcode, "virtio-fs: malformed request: {e}");
            if expects_reply(header.opcode) {
                Outcome::Used(write_error_reply(mem, chain, header.unique, libc::EINVAL))
            } else {
                Outcome::Used(0)
            }
        }
        Err(_) => {
            tracing::error!(
                opcode = header.opcode,
                "virtio-fs: the FUSE server panicked"
            );
            Outcome::Broken
        }
    }
}

/// Whether the driver waits for an answer to `opcode` (FORGET, BATCH_FORGET and INTERRUPT
/// are one-way).
fn expects_reply(opcode: u32) -> bool {
    opcode != Opcode::Forget as u32
        && opcode != Opcode::BatchForget as u32
        && opcode != Opcode::Interrupt as u32
}

/// Writes a bare error reply for a request the server rejected before answering it.
///
/// Where the server did answer before failing, its answer is this same EINVAL header, so
/// writing it again changes nothing.
fn write_error_reply(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    unique: u64,
    errno: i32,
) -> u32 {
    let header = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    match VirtioFsWriter::new(mem, chain) {
        Ok(mut w) => match w.write_all(header.as_slice()) {
            Ok(()) => header.len,
            Err(_) => 0,
        },
        Err(_) => 0,
    }
}
