//! The virtio-vsock device: config space, queue handling, and the bridge between guest
//! descriptor chains and the [`Muxer`].

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::Muxer;
use super::packet::{Header, HEADER_SIZE};
use super::{VsockError, GUEST_CID, MAX_PKT_DATA, QUEUE_SIZE};
use crate::virtio::VIRTIO_F_VERSION_1;
use crate::virtio::{device_type, ActivateError, GuestMem, Interrupt, VirtioDevice};

/// Index of the receive queue (device → guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest → device).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (unused: kiln never migrates a guest).
pub const EVENT_QUEUE: usize = 2;

const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Most tx chains, and separately most rx chains, one call into the device moves. A driver
/// that refills a queue from another vCPU as fast as the device empties it would otherwise keep
/// the event loop (and every other device of the VM, and teardown) waiting; past the budget the
/// device kicks itself and carries on at the next turn of the loop.
pub const CHAINS_PER_EVENT: usize = 64;

/// What one call into the device may still do.
struct Budget {
    tx: usize,
    rx: usize,
}

struct Active {
    mem: GuestMem,
    rxq: Queue,
    txq: Queue,
    evq: Queue,
    interrupt: Interrupt,
}

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2 §5.10.6.7): the driver drops every
/// connection and reads the guest CID again.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// A virtio-vsock device (type 19) whose host side is a Unix socket (Firecracker's protocol).
pub struct Vsock {
    guest_cid: u64,
    pub(super) muxer: Muxer,
    active: Option<Active>,
    broken: bool,
    /// Written when a budget ran out with work left; watched with the host fds, so the event
    /// loop comes back for the rest after serving everything else.
    kick: EventFd,
    /// A transport-reset event is out and the driver has not handled it yet (it kicks the
    /// event queue once it did): until then nothing is delivered to the guest, or a host
    /// connection made right after a restore would be reset by the late event.
    reset_pending: bool,
}

impl Vsock {
    /// A device for guest CID `guest_cid` (kiln uses [`GUEST_CID`]) listening on `uds_path`;
    /// fails if the path is in use.
    pub fn new(uds_path: impl Into<PathBuf>, guest_cid: u64) -> Result<Self, VsockError> {
        if guest_cid < GUEST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::BadCid(guest_cid));
        }
        let uds_path = uds_path.into();
        let kick = EventFd::new(EFD_NONBLOCK).map_err(|source| VsockError::Listen {
            path: uds_path.clone(),
            source,
        })?;
        Ok(Self {
            guest_cid,
            muxer: Muxer::new(uds_path, guest_cid)?,
            active: None,
            broken: false,
            kick,
            reset_pending: false,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Moves packets both ways until neither queue can make progress or the budget of this
    /// call is spent; in the latter case the device kicks itself to go on later.
    fn process(&mut self) {
        if self.broken {
            return;
        }
        let mut budget = Budget {
            tx: CHAINS_PER_EVENT,
            rx: CHAINS_PER_EVENT,
        };
        loop {
            let tx_blocked = self.process_tx(&mut budget);
            let rx_progress = self.process_rx(&mut budget);
            // Tx only stops early when resets back up; go again once the guest took some.
            if !(tx_blocked && rx_progress) || self.broken {
                break;
            }
        }
        if (budget.tx == 0 || budget.rx == 0) && !self.broken {
            if let Err(e) = self.kick.write(1) {
                tracing::warn!("vsock: cannot schedule the rest of the queue work: {e}");
            }
        }
    }

    /// Hands the guest's tx packets to the muxer. Returns true if it stopped because the
    /// guest is not taking resets.
    fn process_tx(&mut self, budget: &mut Budget) -> bool {
        let Some(act) = self.active.as_mut() else {
            return false;
        };
        let mem = &act.mem;
        let mut used = false;
        let mut blocked = false;
        loop {
            if self.muxer.tx_blocked() {
                blocked = true;
                break;
            }
            if budget.tx == 0 {
                break;
            }
            let Some(mut chain) = act.txq.pop_descriptor_chain(mem) else {
                break;
            };
            budget.tx -= 1;
            let head = chain.head_index();
            let probe = chain.clone();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self
                    .muxer
                    .on_guest_packet(Header::of_packet(&pkt), pkt.data_slice()),
                Err(e) => {
                    tracing::debug!("vsock: bad tx packet: {e}");
                    if let Some(hdr) = head_header(mem, probe) {
                        self.muxer.on_bad_packet(hdr);
                    }
                }
            }
            if let Err(e) = act.txq.add_used(mem, head, 0) {
                tracing::warn!("vsock: cannot return a tx buffer: {e}");
                self.broken = true;
                return false;
            }
            used = true;
        }
        if used {
            notify(&mut act.txq, mem, &act.interrupt);
        }
        blocked
    }

    /// Fills the guest's rx buffers with what the muxer has. Returns whether any was used.
    fn process_rx(&mut self, budget: &mut Budget) -> bool {
        if self.reset_pending {
            return false;
        }
        let Some(act) = self.active.as_mut() else {
            return false;
        };
        let mem = &act.mem;
        let mut used = false;
        while self.muxer.has_rx() && budget.rx > 0 {
            let Some(mut chain) = act.rxq.pop_descriptor_chain(mem) else {
                break;
            };
            budget.rx -= 1;
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Err(e) => {
                    tracing::debug!("vsock: bad rx buffer: {e}");
                    0
                }
                Ok(mut pkt) => match pkt.data_slice().copied().filter(|d| !d.is_empty()) {
                    None => {
                        tracing::debug!("vsock: rx buffer without room for data");
                        0
                    }
                    Some(data) => {
                        let Some(hdr) = self.muxer.next_rx(&data) else {
                            // Nothing to send after all: leave the buffer for later.
                            act.rxq.go_to_previous_position();
                            budget.rx += 1;
                            break;
                        };
                        match pkt.set_header_from_raw(&hdr.to_bytes()) {
                            Ok(()) => HEADER_SIZE as u32 + hdr.len,
                            Err(e) => {
                                tracing::warn!("vsock: cannot write an rx header: {e}");
                                0
                            }
                        }
                    }
                },
            };
            if let Err(e) = act.rxq.add_used(mem, head, len) {
                tracing::warn!("vsock: cannot return an rx buffer: {e}");
                self.broken = true;
                return false;
            }
            used = true;
        }
        if used {
            notify(&mut act.rxq, mem, &act.interrupt);
        }
        used
    }
}

/// The header at the head of a chain the packet parser rejected, if it is readable.
fn head_header(mem: &GuestMem, mut chain: DescriptorChain<&GuestMem>) -> Option<Header> {
    let desc = chain.next()?;
    if (desc.len() as usize) < HEADER_SIZE || desc.is_write_only() {
        return None;
    }
    let mut raw = [0u8; HEADER_SIZE];
    mem.read_slice(&mut raw, desc.addr()).ok()?;
    Some(Header::from_bytes(&raw))
}

fn notify(queue: &mut Queue, mem: &GuestMem, interrupt: &Interrupt) {
    // A used ring the device cannot read is reported when it is written next.
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
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
        let n = queues.len();
        let mut it = queues.into_iter();
        let (Some(rxq), Some(txq), Some(evq), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(ActivateError::BadQueue(format!(
                "virtio-vsock needs 3 queues (rx, tx, event), got {n}"
            )));
        };
        self.active = Some(Active {
            mem,
            rxq,
            txq,
            evq,
            interrupt,
        });
        self.broken = false;
        // Host connections may have arrived before the driver was ready.
        self.process();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if index == EVENT_QUEUE && self.reset_pending {
            // The driver handled the reset and gave the buffer back.
            self.reset_pending = false;
        }
        self.process();
    }

    fn host_fds(&self) -> Vec<(RawFd, EventSet)> {
        let mut fds = self.muxer.host_fds();
        fds.push((self.kick.as_raw_fd(), EventSet::IN));
        fds
    }

    fn process_host_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.kick.as_raw_fd() {
            // Drain first: a budget that runs out again below kicks anew.
            let _ = self.kick.read();
        } else {
            self.muxer.on_host_event(fd, events);
        }
        // Does nothing unless the device holds its queues (see `stop`).
        self.process();
    }

    fn stop(&mut self) {
        // The driver is gone until it resets the device: give up the queues so host events
        // cannot reach guest memory, and close host streams rather than leave them hanging.
        self.active = None;
        self.muxer.reset();
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.broken = false;
        self.reset_pending = false;
        self.muxer.reset();
        true
    }

    fn is_broken(&self) -> bool {
        self.broken
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.active
            .iter()
            .flat_map(|a| [&a.rxq, &a.txq, &a.evq])
            .map(|q| (q.next_avail(), q.next_used()))
            .collect()
    }

    fn restored(&mut self) {
        // Connections from before the snapshot have no host side any more.
        self.muxer.reset();
        match self.send_event(EVENT_TRANSPORT_RESET) {
            Ok(()) => self.reset_pending = true,
            Err(e) => tracing::warn!("vsock: cannot send the transport-reset event: {e}"),
        }
    }
}

impl Vsock {
    /// Puts one `virtio_vsock_event` in the first buffer of the event queue.
    fn send_event(&mut self, id: u32) -> Result<(), String> {
        let act = self.active.as_mut().ok_or("the device is not active")?;
        let mem = &act.mem;
        let chain = act
            .evq
            .pop_descriptor_chain(mem)
            .ok_or("the driver gave no event buffer")?;
        let head = chain.head_index();
        let desc = chain
            .clone()
            .find(|d| d.is_write_only() && d.len() >= 4)
            .ok_or("the event buffer has no writable descriptor of 4 bytes")?;
        mem.write_obj(id.to_le(), desc.addr())
            .map_err(|e| format!("cannot write the event: {e}"))?;
        act.evq
            .add_used(mem, head, 4)
            .map_err(|e| format!("cannot add the used entry: {e}"))?;
        act.interrupt.signal_used_queue();
        Ok(())
    }
}
