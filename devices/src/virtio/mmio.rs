//! The virtio-mmio transport, version 2 register layout (virtio 1.2 §4.2.2).
//!
//! [`MmioTransport`] owns what the spec gives the transport: the status state machine, feature
//! negotiation, per-queue configuration and the interrupt status register. It builds
//! `virtio_queue::Queue`s from the driver's registers at DRIVER_OK and hands them to the
//! [`VirtioDevice`]. Every register value comes from the guest and is checked before use: a bad
//! configuration sets DEVICE_NEEDS_RESET, it never panics the VMM.

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;

use super::{GuestMem, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::bus::BusDevice;

/// "virt" in little-endian: the MagicValue register.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The virtio-mmio register layout version this transport implements (non-legacy).
pub const VERSION: u32 = 2;
/// VendorID: the bytes "KILN" as the register reads them in little-endian, the same convention
/// as QEMU's 0x554d4551 ("QEMU"). Linux ignores the value for virtio-mmio.
pub const VENDOR_ID: u32 = 0x4e4c_494b;

/// Register offsets inside a device's window (virtio 1.2 §4.2.2, table "MMIO Device Register
/// Layout"). Public so the VMM (ioeventfd on [`regs::QUEUE_NOTIFY`]) and test drivers share them.
pub mod regs {
    /// R: magic value "virt".
    pub const MAGIC_VALUE: u64 = 0x000;
    /// R: register layout version.
    pub const VERSION: u64 = 0x004;
    /// R: virtio device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// R: vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// R: 32 feature bits of the page chosen by DEVICE_FEATURES_SEL.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// W: feature page for DEVICE_FEATURES.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// W: 32 accepted feature bits of the page chosen by DRIVER_FEATURES_SEL.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// W: feature page for DRIVER_FEATURES.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// W: queue the QUEUE_* registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// R: maximum size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// W: size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// RW: the selected queue is ready to use.
    pub const QUEUE_READY: u64 = 0x044;
    /// W: queue notification (the value is the queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// R: pending interrupt reasons.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// W: acknowledges interrupt reasons.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// RW: device status.
    pub const STATUS: u64 = 0x070;
    /// W: descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// W: descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// W: driver (available) ring address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// W: driver (available) ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// W: device (used) ring address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// W: device (used) ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// W: shared memory region the SHM_* registers refer to.
    pub const SHM_SEL: u64 = 0x0ac;
    /// R: shared memory region length, low 32 bits.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// R: shared memory region length, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// R: shared memory region base, low 32 bits.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// R: shared memory region base, high 32 bits.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// RW: queue reset (only with VIRTIO_F_RING_RESET, which kiln does not offer: reads zero).
    pub const QUEUE_RESET: u64 = 0x0c0;
    /// R: configuration atomicity value.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// RW: start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 0x01;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 0x02;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 0x04;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 0x08;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

use status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};

/// Features the transport cannot honour even if a device offers them: kiln's queues are split
/// rings, notifications carry only the queue index, and queues reset only with the device.
const TRANSPORT_UNSUPPORTED: u64 = (1 << 34) | (1 << 38) | (1 << 40);

/// Why a queue the driver marked ready cannot be used.
#[derive(Debug, thiserror::Error)]
enum QueueSetupError {
    #[error("queue {index}: the device's maximum size {max} is not a power of two up to 32768")]
    MaxSize { index: usize, max: u16 },
    #[error("queue {index}: size {size} is not a power of two between 1 and {max}")]
    Size { index: usize, size: u32, max: u16 },
    #[error("queue {index}: {ring} address {addr:#x} breaks the spec's alignment")]
    Align {
        index: usize,
        ring: &'static str,
        addr: u64,
    },
    #[error("queue {index}: rings (desc {desc:#x}, driver {driver:#x}, device {device:#x}, size {size}) are not inside guest memory")]
    OutsideMemory {
        index: usize,
        desc: u64,
        driver: u64,
        device: u64,
        size: u32,
    },
}

/// One queue's registers as the driver wrote them; turned into a `Queue` at DRIVER_OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            // Drivers must write QueueNum, but defaulting to the maximum is what other VMMs do.
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    fn build(
        &self,
        index: usize,
        mem: &GuestMem,
        event_idx: bool,
    ) -> Result<Queue, QueueSetupError> {
        let max = self.max_size;
        let mut queue = Queue::new(max).map_err(|_| QueueSetupError::MaxSize { index, max })?;
        if !self.ready {
            // A queue the driver left unused goes to the device not ready; it yields nothing.
            return Ok(queue);
        }
        let size_err = || QueueSetupError::Size {
            index,
            size: self.size,
            max,
        };
        let size = u16::try_from(self.size).map_err(|_| size_err())?;
        queue.try_set_size(size).map_err(|_| size_err())?;
        let align = |ring, addr| QueueSetupError::Align { index, ring, addr };
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| align("descriptor table", self.desc))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| align("driver ring", self.driver))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| align("device ring", self.device))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(QueueSetupError::OutsideMemory {
                index,
                desc: self.desc,
                driver: self.driver,
                device: self.device,
                size: self.size,
            });
        }
        Ok(queue)
    }
}

/// A virtio device behind the virtio-mmio version 2 register file; insert it on the MMIO bus.
/// What a snapshot keeps of a transport: its registers, each queue's position and the
/// pending interrupt reasons. The device's own state is its business (see
/// [`VirtioDevice::snapshot_blocker`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The device type, checked on restore.
    pub device_type: u32,
    status: u32,
    activated: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    acked_unknown_page: bool,
    queue_sel: u32,
    shm_sel: u32,
    queues: Vec<QueueRegs>,
    /// `(next_avail, next_used)` per queue held by the device.
    positions: Vec<(u16, u16)>,
    interrupt_status: u32,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    interrupt: Interrupt,
    status: u32,
    activated: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    // The driver wrote a non-zero page beyond the 64 feature bits virtio defines: such features
    // cannot have been offered, so FEATURES_OK is refused.
    acked_unknown_page: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    shm_sel: u32,
}

impl MmioTransport {
    /// A transport for `device`, which gets `mem` and `interrupt` when the driver activates it.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMem, interrupt: Interrupt) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueRegs::new(max))
            .collect();
        Self {
            device,
            mem,
            interrupt,
            status: 0,
            activated: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_unknown_page: false,
            queue_sel: 0,
            queues,
            shm_sel: 0,
        }
    }

    /// The device behind the transport.
    /// The transport's state for a snapshot; refused while the device holds state a snapshot
    /// cannot carry. The device must be quiet (no vCPU or event-loop thread in it).
    pub fn save(&self) -> Result<TransportState, String> {
        if let Some(why) = self.device.snapshot_blocker() {
            return Err(why);
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            activated: self.activated,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            acked_unknown_page: self.acked_unknown_page,
            queue_sel: self.queue_sel,
            shm_sel: self.shm_sel,
            queues: self.queues.clone(),
            positions: self.device.queue_positions(),
            interrupt_status: self.interrupt.status(),
        })
    }

    /// Puts a fresh transport (and its device) in the state [`MmioTransport::save`] returned:
    /// registers, then the device activated with queues at their saved positions, then
    /// [`VirtioDevice::restored`]. Refused, with the transport untouched, when the state is for
    /// another device type or queue layout.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        let device_type = self.device.device_type();
        if state.device_type != device_type {
            return Err(format!(
                "the snapshot has device type {} where this VM has {device_type}",
                state.device_type
            ));
        }
        let same_layout = state.queues.len() == self.queues.len()
            && state
                .queues
                .iter()
                .zip(&self.queues)
                .all(|(a, b)| a.max_size == b.max_size);
        if !same_layout {
            return Err(format!(
                "device type {device_type}: the snapshot's queues do not match this device's"
            ));
        }
        if self.activated {
            return Err("the device is already active".into());
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.acked_unknown_page = state.acked_unknown_page;
        self.queue_sel = state.queue_sel;
        self.shm_sel = state.shm_sel;
        self.queues.clone_from(&state.queues);
        if state.activated {
            let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
            let mut queues = Vec::with_capacity(self.queues.len());
            for (i, regs) in self.queues.iter().enumerate() {
                queues.push(
                    regs.build(i, &self.mem, event_idx)
                        .map_err(|e| e.to_string())?,
                );
            }
            // Devices hold every queue they were given, in order.
            for (queue, &(avail, used)) in queues.iter_mut().zip(&state.positions) {
                queue.set_next_avail(avail);
                queue.set_next_used(used);
            }
            self.device
                .activate(
                    self.mem.clone(),
                    queues,
                    self.interrupt.clone(),
                    self.acked_features,
                )
                .map_err(|e| e.to_string())?;
            self.activated = true;
            self.device.restored();
        }
        self.interrupt.restore_status(state.interrupt_status);
        Ok(())
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind the transport, mutably (for host-side events driven by the VMM).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Number of queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Whether the driver set DRIVER_OK and the device accepted its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The driver notified `queue` (QueueNotify write or the VMM's ioeventfd for it).
    pub fn notify(&mut self, queue: usize) {
        if !self.is_running() {
            tracing::debug!(
                "virtio-mmio: notify for queue {queue} while the device is not running"
            );
            return;
        }
        match self.queues.get(queue) {
            Some(regs) if regs.ready => {
                self.device.process_queue(queue);
                self.check_broken();
            }
            _ => tracing::debug!("virtio-mmio: notify for queue {queue}, which is not in use"),
        }
    }

    /// The device stopped at its per-turn budget with work left on `queue`: the caller should
    /// call [`MmioTransport::notify`] again on a later turn (see [`crate::virtio::Budget`]).
    pub fn backlog(&self, queue: usize) -> bool {
        self.is_running() && self.device.queue_backlog(queue)
    }

    /// One of the device's host file descriptors is ready: let the device handle it.
    ///
    /// The event always reaches the device, so that it drains the fd (a ready fd left alone
    /// would spin the event loop). What keeps it from writing guest memory outside DRIVER_OK,
    /// or after FAILED or DEVICE_NEEDS_RESET, is that the device holds queues only in between:
    /// it gets them at activation and gives them up at [`VirtioDevice::stop`], which the
    /// transport calls whenever it starts refusing notifications, and at reset. That holds
    /// as well for host events delivered through [`MmioTransport::device_mut`].
    pub fn process_host_event(&mut self, fd: RawFd, events: EventSet) {
        self.device.process_host_event(fd, events);
        if self.is_running() {
            self.check_broken();
        }
    }

    /// Activated and neither failed nor waiting for a reset.
    fn is_running(&self) -> bool {
        self.activated && self.status & (DEVICE_NEEDS_RESET | FAILED) == 0
    }

    /// Notifications stop here until a reset: take the queues away from the device too.
    fn stop_device(&mut self) {
        if self.activated {
            self.device.stop();
        }
    }

    fn check_broken(&mut self) {
        if self.device.is_broken() {
            self.set_needs_reset();
        }
    }

    /// Sets DEVICE_NEEDS_RESET and, once the driver is running, tells it through a config
    /// change interrupt as the spec requires (§2.1.2).
    fn set_needs_reset(&mut self) {
        if self.status & DEVICE_NEEDS_RESET != 0 {
            return;
        }
        self.status |= DEVICE_NEEDS_RESET;
        self.stop_device();
        if self.status & DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() & !TRANSPORT_UNSUPPORTED
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.offered_features();
        let unknown = self.acked_features & !offered;
        if unknown != 0 || self.acked_unknown_page {
            tracing::warn!(
                "virtio-mmio: driver accepted features {unknown:#x} the device did not offer"
            );
            false
        } else if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            false
        } else {
            true
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index)
    }

    /// The selected queue, if the driver may configure it now: after FEATURES_OK, before
    /// DRIVER_OK, and (except for QueueReady) while the queue is not enabled.
    fn configurable_queue(&mut self, ready_write: bool) -> Option<&mut QueueRegs> {
        if self.status & (FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET | FAILED) != FEATURES_OK {
            return None;
        }
        self.selected_queue().filter(|q| ready_write || !q.ready)
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & FAILED != 0 {
            self.status |= FAILED;
            self.stop_device();
            return;
        }
        // Only the reset (0) above may clear bits; each step adds exactly the next one.
        if value & self.status != self.status {
            tracing::warn!(
                "virtio-mmio: status {value:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        match (self.status, added) {
            (_, 0) => {}
            (0, ACKNOWLEDGE) => self.status = ACKNOWLEDGE,
            (ACKNOWLEDGE, DRIVER) => self.status |= DRIVER,
            (s, FEATURES_OK) if s == ACKNOWLEDGE | DRIVER => {
                if self.features_acceptable() {
                    self.status |= FEATURES_OK;
                }
            }
            (s, DRIVER_OK) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => self.activate(),
            (s, a) => tracing::warn!("virtio-mmio: status {s:#x} cannot gain bits {a:#x}; ignored"),
        }
    }

    fn activate(&mut self) {
        self.status |= DRIVER_OK;
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues: Result<Vec<Queue>, QueueSetupError> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, regs)| regs.build(i, &self.mem, event_idx))
            .collect();
        let result = match queues {
            Ok(queues) => self
                .device
                .activate(
                    self.mem.clone(),
                    queues,
                    self.interrupt.clone(),
                    self.acked_features,
                )
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(
                    "virtio-mmio: cannot activate device type {}: {e}",
                    self.device.device_type()
                );
                self.set_needs_reset();
            }
        }
    }

    /// The driver wrote 0 to Status: back to the state right after `new`.
    fn reset(&mut self) {
        if self.activated {
            if !self.device.reset() {
                tracing::warn!(
                    "virtio-mmio: device type {} cannot be reset; it stays failed",
                    self.device.device_type()
                );
                self.set_needs_reset();
                return;
            }
            self.activated = false;
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_unknown_page = false;
        self.queue_sel = 0;
        self.shm_sel = 0;
        for regs in &mut self.queues {
            *regs = QueueRegs::new(regs.max_size);
        }
        self.interrupt.ack(u32::MAX);
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MAGIC_VALUE,
            regs::VERSION => VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => {
                let features = self.offered_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status,
            // No shared memory regions: the spec's "no such region" answer is a length of -1.
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            // kiln devices have a static config space, so one generation covers every read.
            regs::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::DRIVER_FEATURES => self.write_driver_features(value),
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM => {
                if let Some(q) = self.configurable_queue(false) {
                    q.size = value;
                }
            }
            regs::QUEUE_READY => {
                if let (Some(q), 0 | 1) = (self.configurable_queue(true), value) {
                    q.ready = value == 1;
                }
            }
            regs::QUEUE_DESC_LOW => self.write_queue_addr(|q| &mut q.desc, false, value),
            regs::QUEUE_DESC_HIGH => self.write_queue_addr(|q| &mut q.desc, true, value),
            regs::QUEUE_DRIVER_LOW => self.write_queue_addr(|q| &mut q.driver, false, value),
            regs::QUEUE_DRIVER_HIGH => self.write_queue_addr(|q| &mut q.driver, true, value),
            regs::QUEUE_DEVICE_LOW => self.write_queue_addr(|q| &mut q.device, false, value),
            regs::QUEUE_DEVICE_HIGH => self.write_queue_addr(|q| &mut q.device, true, value),
            regs::QUEUE_NOTIFY => {
                if let Ok(index) = usize::try_from(value) {
                    self.notify(index);
                }
            }
            regs::INTERRUPT_ACK => self.interrupt.ack(value),
            regs::STATUS => self.write_status(value),
            regs::SHM_SEL => self.shm_sel = value,
            _ => tracing::debug!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status != ACKNOWLEDGE | DRIVER {
            tracing::debug!(
                "virtio-mmio: DriverFeatures written in status {:#x}",
                self.status
            );
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | value,
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (value << 32),
            _ => self.acked_unknown_page |= value != 0,
        }
    }

    fn write_queue_addr(&mut self, field: fn(&mut QueueRegs) -> &mut u64, high: bool, value: u32) {
        if let Some(q) = self.configurable_queue(false) {
            let addr = field(q);
            let value = u64::from(value);
            *addr = if high {
                (*addr & 0xffff_ffff) | (value << 32)
            } else {
                (*addr & !0xffff_ffff) | value
            };
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= regs::CONFIG {
            self.device.read_config(offset - regs::CONFIG, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            tracing::debug!(
                "virtio-mmio: {}-byte read of register {offset:#x}",
                data.len()
            );
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            self.device.write_config(offset - regs::CONFIG, data);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            tracing::debug!(
                "virtio-mmio: {}-byte write to register {offset:#x}",
                data.len()
            );
        }
    }
}

#[cfg(test)]
mod tests;
