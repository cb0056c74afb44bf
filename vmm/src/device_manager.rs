//! Places virtio devices on the MMIO bus: one 4 KiB virtio-mmio window and one GSI each,
//! queue notifications through ioeventfds, interrupts through irqfds, device work on the event
//! loop. Also produces what the guest needs to find them: ACPI slots and cmdline entries.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kiln_devices::virtio::mmio::MmioTransport;
use kiln_devices::virtio::{GuestMem, Interrupt, VirtioDevice};
use kiln_devices::Bus;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::VirtioMmioSlot;
use crate::event_loop::Subscriber;
use crate::host_fds::HostFdWatch;
use crate::layout::{VIRTIO_IRQ_BASE, VIRTIO_IRQ_MAX, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};

/// Offset of the QueueNotify register in a virtio-mmio window.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Event data marking a host fd (queue eventfds use the queue index).
const HOST_FD_DATA: u32 = u32::MAX;

/// Errors placing a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// More devices than GSIs.
    #[error("too many virtio devices: kiln has {max} virtio-mmio slots (GSIs {VIRTIO_IRQ_BASE}-{VIRTIO_IRQ_MAX})")]
    TooMany {
        /// Slots available.
        max: usize,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} for virtio device {index}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// Slot index.
        index: usize,
        /// The OS error.
        source: kvm_ioctls::Error,
    },
    /// An eventfd or epoll fd could not be created.
    #[error("cannot create an eventfd or epoll fd for virtio device {index}: {source}")]
    EventFd {
        /// Slot index.
        index: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The MMIO window could not be registered.
    #[error(transparent)]
    Bus(#[from] kiln_devices::BusError),
}

/// Number of virtio-mmio slots (one GSI each).
pub const MAX_VIRTIO_DEVICES: usize = (VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize;

/// The virtio devices of one VM.
#[derive(Default)]
pub struct DeviceManager {
    slots: Vec<VirtioMmioSlot>,
    subscribers: Vec<Subscriber>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` in the next slot: MMIO window on `mmio`, irqfd, one ioeventfd per queue.
    pub fn add_virtio(
        &mut self,
        vm_fd: &VmFd,
        mem: &GuestMem,
        mmio: &mut Bus,
        device: Box<dyn VirtioDevice>,
    ) -> Result<VirtioMmioSlot, DeviceError> {
        let index = self.slots.len();
        if index >= MAX_VIRTIO_DEVICES {
            return Err(DeviceError::TooMany {
                max: MAX_VIRTIO_DEVICES,
            });
        }
        let slot = VirtioMmioSlot {
            base: VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_IRQ_BASE + index as u32,
        };
        let evt = || {
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| DeviceError::EventFd { index, source })
        };
        let irq = evt()?;
        vm_fd
            .register_irqfd(&irq, slot.gsi)
            .map_err(|source| DeviceError::Kvm {
                op: "KVM_IRQFD",
                index,
                source,
            })?;
        let queue_count = device.queue_max_sizes().len();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            mem.clone(),
            Interrupt::new(irq),
        )));
        let mut queue_evts = Vec::with_capacity(queue_count);
        for q in 0..queue_count {
            let e = evt()?;
            vm_fd
                .register_ioevent(
                    &e,
                    &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(|source| DeviceError::Kvm {
                    op: "KVM_IOEVENTFD",
                    index,
                    source,
                })?;
            queue_evts.push(e);
        }
        let host_fds =
            HostFdWatch::new().map_err(|source| DeviceError::EventFd { index, source })?;
        mmio.insert(transport.clone(), slot.base, slot.size)?;
        self.transports.push(transport.clone());
        self.subscribers.push(Arc::new(Mutex::new(VirtioSubscriber {
            transport,
            queue_evts,
            host_fds,
        })));
        self.slots.push(slot);
        Ok(slot)
    }

    /// Each device's transport, in slot order (snapshots save and restore them).
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// The slots, for the ACPI DSDT.
    pub fn slots(&self) -> &[VirtioMmioSlot] {
        &self.slots
    }

    /// `virtio_mmio.device=` entries for kernels built with VIRTIO_MMIO_CMDLINE_DEVICES.
    pub fn cmdline_entries(&self) -> Vec<String> {
        cmdline_entries(&self.slots)
    }

    /// The event-loop subscribers (one per device); hands them over once.
    pub fn take_subscribers(&mut self) -> Vec<Subscriber> {
        std::mem::take(&mut self.subscribers)
    }
}

/// `virtio_mmio.device=<size>@<base>:<irq>` for each slot (Linux's virtio_mmio format).
pub fn cmdline_entries(slots: &[VirtioMmioSlot]) -> Vec<String> {
    slots
        .iter()
        .map(|s| {
            format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                s.size >> 10,
                s.base,
                s.gsi
            )
        })
        .collect()
}

/// Runs a device's queue and host-socket work on the event loop.
struct VirtioSubscriber {
    transport: Arc<Mutex<MmioTransport>>,
    queue_evts: Vec<EventFd>,
    /// The device's host fds, behind one epoll fd the event loop watches (see [`HostFdWatch`]).
    host_fds: HostFdWatch,
}

impl VirtioSubscriber {
    /// Brings the watched host fds in line with what the device asks for now.
    fn sync_host_fds(&mut self) {
        let wanted = {
            let t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
            t.device().host_fds()
        };
        self.host_fds.sync(wanted);
    }
}

impl MutEventSubscriber for VirtioSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if data == HOST_FD_DATA {
            for (fd, set) in self.host_fds.ready() {
                let mut t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
                // An fd the device closed while handling an earlier one is not found there
                // and ignored.
                t.process_host_event(fd, set);
            }
        } else if let Some(evt) = self.queue_evts.get(data as usize) {
            // Drain the counter first so a notify that lands during processing re-arms it.
            let _ = evt.read();
            let backlog = {
                let mut t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
                t.notify(data as usize);
                t.backlog(data as usize)
            };
            // The device stopped at its per-turn budget: come back after the other ready
            // devices had their turn, as if the driver had notified again.
            if backlog {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("cannot re-raise queue {data}'s notification: {e}");
                }
            }
        }
        self.sync_host_fds();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("cannot watch queue {i} notifications: {e:?}");
            }
        }
        let host = Events::with_data_raw(self.host_fds.as_raw_fd(), HOST_FD_DATA, EventSet::IN);
        if let Err(e) = ops.add(host) {
            tracing::error!("cannot watch the device's host fds: {e:?}");
        }
        self.sync_host_fds();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_entries_use_linux_syntax() {
        let slots = [
            VirtioMmioSlot {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            },
            VirtioMmioSlot {
                base: 0xd000_1000,
                size: 0x1000,
                gsi: 6,
            },
        ];
        assert_eq!(
            cmdline_entries(&slots),
            vec![
                "virtio_mmio.device=4K@0xd0000000:5",
                "virtio_mmio.device=4K@0xd0001000:6"
            ]
        );
        assert_eq!(MAX_VIRTIO_DEVICES, 19);
    }
}
