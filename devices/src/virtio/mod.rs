//! Virtio devices and the virtio-mmio transport (virtio 1.2, version 2 registers).
//!
//! The contract between a device model and its transport is [`VirtioDevice`]: the transport
//! owns feature negotiation, queue configuration and the interrupt status register; the device
//! owns its config space and request processing. Devices see guest memory and an
//! [`Interrupt`], never KVM.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod rng;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub mod vsock;

/// Guest memory as devices see it.
pub type GuestMem = GuestMemoryMmap<()>;

/// Feature bit: the device complies with virtio 1.0+ (mandatory for virtio-mmio version 2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: descriptors may be indirect tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Feature bit: used/avail event index suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device IDs (virtio 1.2 §5).
pub mod device_type {
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
    /// File system device.
    pub const FS: u32 = 26;
}

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// A device's interrupt line: the virtio-mmio InterruptStatus register plus the eventfd the VMM
/// registered as an irqfd. Cloneable; all clones share the status.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    evt: Arc<EventFd>,
}

impl Interrupt {
    /// An interrupt signalling `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(evt),
        }
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver the config space changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("cannot signal the virtio interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Sets the status bits a snapshot saved and signals them again (a spurious interrupt is
    /// harmless; a lost one would stall the driver).
    pub fn restore_status(&self, bits: u32) {
        if bits != 0 {
            self.raise(bits);
        }
    }

    /// The eventfd (for tests and for the VMM's irqfd registration).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// The driver's available ring cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The available ring lies outside guest memory.
    #[error("the available ring is outside guest memory: {0}")]
    Unreadable(virtio_queue::Error),
    /// The driver's index is more than a queue's worth ahead: virtio-queue would pop nothing
    /// while reporting more work, so a loop over it would never end.
    #[error("the available index is {pending} entries ahead of a queue of {size}")]
    Ahead {
        /// Entries the index claims.
        pending: u16,
        /// The queue size.
        size: u16,
    },
}

/// How many new chains the driver has made available, checked against the queue size.
pub fn pending_chains(queue: &Queue, mem: &GuestMem) -> Result<u16, RingError> {
    use virtio_queue::QueueT;
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(RingError::Unreadable)?;
    let pending = avail.0.wrapping_sub(queue.next_avail());
    if pending > queue.size() {
        return Err(RingError::Ahead {
            pending,
            size: queue.size(),
        });
    }
    Ok(pending)
}

/// Most descriptor chains a device serves per call of [`VirtioDevice::process_queue`].
pub const CHAINS_PER_TURN: u32 = 64;
/// Most bytes a device moves (guest memory <-> host) per call of
/// [`VirtioDevice::process_queue`].
pub const BYTES_PER_TURN: u64 = 8 << 20;

/// The work one device may do for one queue notification before it gives the event loop back.
///
/// All devices share one event-loop thread, so a driver that keeps its ring full (or asks for
/// huge transfers) must not keep the others from their turn. A device charges every chain and
/// every byte it moves here; once [`Budget::exhausted`] it stops, keeps whatever it has not
/// finished, and answers true from [`VirtioDevice::queue_backlog`]. The event loop then raises
/// the queue's notification again itself, so the rest is served on a later loop turn, after
/// the other ready devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    chains: u32,
    bytes: u64,
}

impl Budget {
    /// [`CHAINS_PER_TURN`] chains and [`BYTES_PER_TURN`] bytes.
    pub fn per_turn() -> Self {
        Self::new(CHAINS_PER_TURN, BYTES_PER_TURN)
    }

    /// A budget of `chains` chains and `bytes` bytes.
    pub fn new(chains: u32, bytes: u64) -> Self {
        Self { chains, bytes }
    }

    /// Charges one descriptor chain.
    pub fn charge_chain(&mut self) {
        self.chains = self.chains.saturating_sub(1);
    }

    /// Charges `n` bytes moved.
    pub fn charge_bytes(&mut self, n: u64) {
        self.bytes = self.bytes.saturating_sub(n);
    }

    /// Bytes still allowed this turn.
    pub fn bytes_left(&self) -> u64 {
        self.bytes
    }

    /// Nothing more may be done this turn.
    pub fn exhausted(&self) -> bool {
        self.chains == 0 || self.bytes == 0
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured the queues in a way the device cannot use.
    #[error("bad queue configuration: {0}")]
    BadQueue(String),
    /// A host resource the device needs is unavailable.
    #[error("device backend unavailable: {0}")]
    Backend(String),
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID ([`device_type`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;

    /// Reads the device-specific config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific config space; read-only fields ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Starts the device with the driver's queues after DRIVER_OK. `acked_features` is what
    /// the driver accepted.
    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        acked_features: u64,
    ) -> Result<(), ActivateError>;

    /// The driver notified queue `index`: process what it made available. Guest data is
    /// untrusted: errors go back to the guest as status codes or mark the device broken (see
    /// [`VirtioDevice::is_broken`]), never as a panic.
    /// Bounded: at most one [`Budget::per_turn`] of work per call (see [`Budget`]).
    fn process_queue(&mut self, index: usize);

    /// Whether the last [`VirtioDevice::process_queue`] for queue `index` stopped at its
    /// [`Budget`] with work left. The event loop then notifies the queue again on a later turn
    /// (as if the driver had), so the device needs no timer of its own. Default: never.
    fn queue_backlog(&self, _index: usize) -> bool {
        false
    }

    /// Host-side file descriptors the device wants watched (sockets, timers), with the events
    /// of interest. Asked again after every call into the device, so the set may change.
    fn host_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }

    /// One of [`VirtioDevice::host_fds`] is ready. Called whatever the driver's state (so that a
    /// ready fd is drained and does not spin the event loop): a device touches its queues here
    /// only while it holds them, between `activate` and `stop` or `reset`.
    fn process_host_event(&mut self, _fd: RawFd, _events: EventSet) {}

    /// The transport stopped passing notifications until the driver resets the device (the
    /// driver set FAILED, or the device needs a reset): drop the queues, so that host events
    /// can no longer make the device write guest memory. The default suits devices that only
    /// act on notifications.
    fn stop(&mut self) {}

    /// The driver reset the device: drop queues and per-activation state. Returns false if the
    /// device cannot be reset (the transport then keeps it failed).
    fn reset(&mut self) -> bool;

    /// Whether the device detected a driver error it cannot recover from (the transport then
    /// sets DEVICE_NEEDS_RESET).
    fn is_broken(&self) -> bool {
        false
    }

    /// `(next_avail, next_used)` of each queue the device holds, in queue order; empty before
    /// activation. A snapshot saves them; a restore hands them back through the queues given
    /// to [`VirtioDevice::activate`].
    fn queue_positions(&self) -> Vec<(u16, u16)> {
        Vec::new()
    }

    /// Why this device's state cannot go into a snapshot now (e.g. a FUSE session the host side
    /// would have to carry over), or `None` when it can.
    fn snapshot_blocker(&self) -> Option<String> {
        None
    }

    /// Called once after a restore re-activated the device: tell the driver what did not
    /// survive (vsock: the transport-reset event for connections from before the snapshot).
    fn restored(&mut self) {}
}
