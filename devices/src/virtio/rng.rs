//! virtio-rng (virtio 1.2 §5.4): fills the guest's buffers from the host's getrandom, so guests
//! do not stall on entropy at boot.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::Bytes;

use super::{
    device_type, pending_chains, ActivateError, Budget, GuestMem, Interrupt, RingError,
    VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per descriptor chain: a guest cannot make the host produce more per
/// request, whatever lengths it writes into its descriptors.
pub const MAX_BYTES_PER_CHAIN: u32 = 64 * 1024;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// A device-writable descriptor points outside guest memory.
    #[error("guest buffer {addr:#x}+{len:#x} is not inside guest memory")]
    OutsideMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length (after the per-chain cap).
        len: u32,
    },
    /// The host's getrandom failed.
    #[error("host getrandom failed: {0}")]
    Entropy(getrandom::Error),
    /// The driver's available ring cannot be trusted.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The rings could not be read or updated.
    #[error("cannot access the virtqueue: {0}")]
    Queue(virtio_queue::Error),
}

/// State that exists between DRIVER_OK and reset.
struct Active {
    mem: GuestMem,
    queue: Queue,
    interrupt: Interrupt,
}

/// The virtio entropy device.
pub struct Rng {
    active: Option<Active>,
    broken: bool,
    /// The last turn stopped at its [`Budget`]; the event loop notifies again.
    backlog: bool,
    // Reused for every request; never larger than MAX_BYTES_PER_CHAIN.
    buf: Vec<u8>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A device that is not yet activated.
    pub fn new() -> Self {
        Self {
            active: None,
            broken: false,
            backlog: false,
            buf: vec![0; MAX_BYTES_PER_CHAIN as usize],
        }
    }

    /// Serves available chains until the ring is empty, then re-enables notifications (the
    /// EVENT_IDX-safe loop); stops early, with notifications still off and `backlog` set, once
    /// one turn's [`Budget`] is spent, however fast the driver refills the ring.
    fn process(&mut self) -> Result<(), RngError> {
        self.backlog = false;
        let Some(Active {
            mem,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            return Ok(());
        };
        let mut used = false;
        let mut budget = Budget::per_turn();
        loop {
            queue.disable_notification(mem).map_err(RngError::Queue)?;
            while !budget.exhausted() {
                let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                let head = chain.head_index();
                let len = match fill_chain(mem, chain, &mut self.buf) {
                    Ok(len) => len,
                    // The driver's mistake: answer with nothing written and carry on.
                    Err(e @ RngError::OutsideMemory { .. }) => {
                        tracing::warn!("virtio-rng: chain {head}: {e}");
                        0
                    }
                    Err(e) => return Err(e),
                };
                queue.add_used(mem, head, len).map_err(RngError::Queue)?;
                used = true;
                budget.charge_chain();
                budget.charge_bytes(u64::from(len));
            }
            if budget.exhausted() {
                // The next turn re-enables notifications once the ring is empty.
                self.backlog = true;
                break;
            }
            if !queue.enable_notification(mem).map_err(RngError::Queue)? {
                break;
            }
            // More is available, but a driver index more than a queue's worth ahead makes
            // virtio-queue pop nothing: without this check the loop would spin forever.
            pending_chains(queue, mem)?;
        }
        if used && queue.needs_notification(mem).map_err(RngError::Queue)? {
            interrupt.signal_used_queue();
        }
        Ok(())
    }
}

/// Fills the chain's device-writable buffers with random bytes, up to [`MAX_BYTES_PER_CHAIN`]
/// in total; returns the byte count. Device-readable descriptors are skipped.
fn fill_chain(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    buf: &mut [u8],
) -> Result<u32, RngError> {
    let mut total: u32 = 0;
    // The iterator stops after queue-size descriptors, so a looping chain ends too.
    for desc in chain.writable() {
        let room = MAX_BYTES_PER_CHAIN - total;
        if room == 0 {
            break;
        }
        let len = desc.len().min(room);
        // `len` is capped at MAX_BYTES_PER_CHAIN, the buffer's length, so this always fits.
        let bytes = buf.get_mut(..len as usize).ok_or(RngError::OutsideMemory {
            addr: desc.addr().0,
            len,
        })?;
        getrandom::fill(bytes).map_err(RngError::Entropy)?;
        mem.write_slice(bytes, desc.addr())
            .map_err(|_| RngError::OutsideMemory {
                addr: desc.addr().0,
                len,
            })?;
        total += len;
    }
    Ok(total)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let count = queues.len();
        let queue = queues
            .into_iter()
            .next()
            .filter(|q| q.ready() && count == 1)
            .ok_or_else(|| {
                ActivateError::BadQueue(format!(
                    "virtio-rng needs its one request queue enabled, got {count} queue(s)"
                ))
            })?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        self.broken = false;
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if index != 0 || self.broken {
            return;
        }
        if let Err(e) = self.process() {
            tracing::error!("virtio-rng: {e}; the device needs a reset");
            self.broken = true;
        }
    }

    fn queue_backlog(&self, index: usize) -> bool {
        index == 0 && self.backlog && !self.broken
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.broken = false;
        self.backlog = false;
        true
    }

    fn is_broken(&self) -> bool {
        self.broken
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.active
            .iter()
            .map(|a| (a.queue.next_avail(), a.queue.next_used()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::mmio::{regs, status, MmioTransport};
    use crate::virtio::testing::{
        guest_memory, interrupt, raw_desc, signal_count, Desc, MmioDriver, TestQueue,
    };
    use crate::virtio::VIRTIO_MMIO_INT_VRING;

    const MEM_SIZE: usize = 0x20_0000;

    fn read(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// An activated rng over a 16-entry queue at 0x1000.
    fn active_rng(features: u64) -> (Rng, GuestMem, TestQueue, Interrupt) {
        let mem = guest_memory(MEM_SIZE);
        let tq = TestQueue::new(&mem, 0x1000, 16);
        let irq = interrupt();
        let mut queue = tq.queue();
        queue.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        let mut rng = Rng::new();
        rng.activate(mem.clone(), vec![queue], irq.clone(), features)
            .unwrap();
        (rng, mem, tq, irq)
    }

    #[test]
    fn handshake_through_mmio_then_read_entropy() {
        let mem = guest_memory(MEM_SIZE);
        let irq = interrupt();
        let mut t = MmioTransport::new(Box::new(Rng::new()), mem.clone(), irq.clone());
        let mut tq = TestQueue::new(&mem, 0x1000, 16);
        let mut d = MmioDriver::new(&mut t);
        assert_eq!(d.read(regs::DEVICE_ID), device_type::RNG);
        let features = d.device_features();
        assert_eq!(features, Rng::new().features());
        assert_ne!(d.negotiate(features) & status::FEATURES_OK, 0);
        d.setup_queue(0, &tq);
        assert_eq!(d.driver_ok() & status::DRIVER_OK, status::DRIVER_OK);
        let head = tq.add_chain(&[Desc::writable(0x10000, 32)]);
        let mut d = MmioDriver::new(&mut t);
        d.write(regs::QUEUE_NOTIFY, 0);
        assert_eq!(tq.used(0), (u32::from(head), 32));
        assert_ne!(read(&mem, 0x10000, 32), vec![0; 32]);
        assert_eq!(d.read(regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(signal_count(&irq), 1);
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let (mut rng, mem, mut tq, irq) = active_rng(VIRTIO_F_VERSION_1);
        let a = tq.add_chain(&[Desc::writable(0x10000, 256)]);
        let b = tq.add_chain(&[Desc::writable(0x20000, 100), Desc::writable(0x30000, 28)]);
        rng.process_queue(0);
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(tq.used(0), (u32::from(a), 256));
        assert_eq!(tq.used(1), (u32::from(b), 128));
        let first = read(&mem, 0x10000, 256);
        assert_ne!(first, vec![0; 256]);
        assert_ne!(
            first,
            read(&mem, 0x20000, 256),
            "two requests got the same bytes"
        );
        assert_ne!(read(&mem, 0x30000, 28), vec![0; 28]);
        // Nothing past the buffers was touched.
        assert_eq!(read(&mem, 0x10000 + 256, 16), vec![0; 16]);
        assert_eq!(signal_count(&irq), 1);
        assert!(!rng.is_broken());
    }

    #[test]
    fn skips_device_readable_descriptors() {
        let (mut rng, mem, mut tq, _) = active_rng(VIRTIO_F_VERSION_1);
        mem.write_slice(&[0xaa; 64], GuestAddress(0x10000)).unwrap();
        let head = tq.add_chain(&[
            Desc::readable(0x10000, 64),
            Desc::writable(0x20000, 16),
            Desc::readable(0x10000, 64),
        ]);
        rng.process_queue(0);
        assert_eq!(tq.used(0), (u32::from(head), 16));
        assert_eq!(read(&mem, 0x10000, 64), vec![0xaa; 64]);
        // A chain with no writable buffer at all is answered with zero bytes.
        let ro = tq.add_chain(&[Desc::readable(0x10000, 64)]);
        rng.process_queue(0);
        assert_eq!(tq.used(1), (u32::from(ro), 0));
    }

    #[test]
    fn caps_the_bytes_per_chain() {
        let (mut rng, mem, mut tq, _) = active_rng(VIRTIO_F_VERSION_1);
        let head = tq.add_chain(&[
            Desc::writable(0x10_0000, 0x10_0000),
            Desc::writable(0x8000, 16),
        ]);
        rng.process_queue(0);
        assert_eq!(tq.used(0), (u32::from(head), MAX_BYTES_PER_CHAIN));
        let cap = MAX_BYTES_PER_CHAIN as u64;
        assert_eq!(read(&mem, 0x10_0000 + cap, 64), vec![0; 64]);
        assert_eq!(read(&mem, 0x8000, 16), vec![0; 16]);
    }

    #[test]
    fn chains_outside_memory_get_zero_bytes_and_the_device_carries_on() {
        let (mut rng, _, mut tq, _) = active_rng(VIRTIO_F_VERSION_1);
        let end = MEM_SIZE as u64;
        let outside = tq.add_chain(&[Desc::writable(end + 0x1000, 64)]);
        let straddling = tq.add_chain(&[Desc::writable(end - 8, 64)]);
        let wrapping = tq.add_chain(&[Desc::writable(u64::MAX - 4, 64)]);
        // A next index past the table ends the chain early instead of reading out of bounds.
        tq.set_desc(12, raw_desc(0x10000, 8, 1 | 2, 999));
        tq.publish(12);
        let good = tq.add_chain(&[Desc::writable(0x10000, 8)]);
        rng.process_queue(0);
        assert_eq!(tq.used_idx(), 5);
        assert_eq!(tq.used(0), (u32::from(outside), 0));
        assert_eq!(tq.used(1), (u32::from(straddling), 0));
        assert_eq!(tq.used(2), (u32::from(wrapping), 0));
        assert_eq!(tq.used(3), (12, 8));
        assert_eq!(tq.used(4), (u32::from(good), 8));
        assert!(!rng.is_broken());
    }

    #[test]
    fn a_descriptor_loop_is_cut_off_at_the_queue_size() {
        let (mut rng, _, tq, _) = active_rng(VIRTIO_F_VERSION_1);
        let write_next = 1 | 2;
        tq.set_desc(0, raw_desc(0x10000, 100, write_next, 1));
        tq.set_desc(1, raw_desc(0x20000, 100, write_next, 0));
        tq.publish(0);
        rng.process_queue(0);
        // virtio-queue's iterator yields at most queue-size (16) descriptors per chain.
        assert_eq!(tq.used(0), (0, 16 * 100));
        assert!(!rng.is_broken());
    }

    #[test]
    fn an_avail_index_beyond_the_queue_size_breaks_the_device_instead_of_hanging() {
        let (mut rng, mem, tq, irq) = active_rng(VIRTIO_F_VERSION_1);
        mem.write_obj(100u16, GuestAddress(tq.avail_ring() + 2))
            .unwrap();
        rng.process_queue(0);
        assert!(rng.is_broken());
        assert_eq!(tq.used_idx(), 0);
        assert_eq!(signal_count(&irq), 0);
        // Broken stays broken until reset; the next driver gets a fresh device.
        rng.process_queue(0);
        assert!(rng.reset() && !rng.is_broken());
    }

    #[test]
    fn follows_indirect_tables() {
        let (mut rng, mem, mut tq, _) =
            active_rng(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC);
        let head = tq.add_indirect_chain(
            0x40000,
            &[Desc::readable(0x10000, 4), Desc::writable(0x20000, 48)],
        );
        rng.process_queue(0);
        assert_eq!(tq.used(0), (u32::from(head), 48));
        assert_ne!(read(&mem, 0x20000, 48), vec![0; 48]);
    }

    #[test]
    fn event_idx_suppresses_interrupts_and_asks_for_the_next_notification() {
        let (mut rng, _, mut tq, irq) = active_rng(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        // The driver wants an interrupt only once the third buffer is used.
        tq.set_used_event(2);
        for i in 0..3u16 {
            tq.add_chain(&[Desc::writable(0x10000, 8)]);
            rng.process_queue(0);
            assert_eq!(tq.avail_event(), i + 1);
            let expected = u64::from(i == 2);
            assert_eq!(signal_count(&irq), expected, "after request {i}");
        }
    }

    #[test]
    fn activation_needs_exactly_one_ready_queue() {
        let mem = guest_memory(MEM_SIZE);
        let mut rng = Rng::new();
        assert!(rng.activate(mem.clone(), vec![], interrupt(), 0).is_err());
        let not_ready = Queue::new(QUEUE_SIZE).unwrap();
        assert!(rng
            .activate(mem.clone(), vec![not_ready], interrupt(), 0)
            .is_err());
        let tq = TestQueue::new(&mem, 0x1000, 16);
        assert!(rng
            .activate(mem.clone(), vec![tq.queue(), tq.queue()], interrupt(), 0)
            .is_err());
        // Before activation, after reset, and for a queue it does not have, nothing happens.
        rng.process_queue(0);
        rng.process_queue(3);
        rng.activate(mem, vec![tq.queue()], interrupt(), 0).unwrap();
        assert!(rng.reset());
        rng.process_queue(0);
        assert_eq!(tq.used_idx(), 0);
    }

    #[test]
    fn a_ring_refilled_from_another_thread_is_served_one_budget_per_turn() {
        use crate::virtio::testing::Refiller;
        use crate::virtio::CHAINS_PER_TURN;
        use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
        let mem = guest_memory(MEM_SIZE);
        let tq = TestQueue::new(&mem, 0x1000, QUEUE_SIZE);
        let mut rng = Rng::new();
        rng.activate(
            mem.clone(),
            vec![tq.queue()],
            interrupt(),
            VIRTIO_F_VERSION_1,
        )
        .unwrap();
        // One 4 KiB buffer, made available again and again: a hostile driver's flood.
        tq.set_desc(0, raw_desc(0x40000, 4096, VRING_DESC_F_WRITE as u16, 0));
        for _ in 0..QUEUE_SIZE {
            tq.publish(0);
        }
        let refiller = Refiller::start(&tq, 0);
        let mut before = tq.used_idx();
        // At least 50 turns, and until the refiller thread has run at all (a loaded machine
        // may not schedule it at once).
        let started = std::time::Instant::now();
        for turn in 0.. {
            if turn >= 50 && refiller.published() > 0 {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "the refiller never ran"
            );
            rng.process_queue(0);
            let served = u32::from(tq.used_idx().wrapping_sub(before));
            assert!(served <= CHAINS_PER_TURN, "one turn served {served} chains");
            // A full turn leaves work for later and says so; the refiller may fall behind
            // later, and a turn that empties the ring has nothing left.
            if turn == 0 {
                assert_eq!(served, CHAINS_PER_TURN);
            }
            if served == CHAINS_PER_TURN {
                assert!(
                    rng.queue_backlog(0),
                    "work left, but no later turn asked for"
                );
            }
            before = tq.used_idx();
        }
        assert!(refiller.stop() > 0);
        // Once the driver stops, a few more turns empty the ring and the backlog ends.
        let mut turns = 0;
        loop {
            rng.process_queue(0);
            turns += 1;
            if !rng.queue_backlog(0) {
                break;
            }
            assert!(turns < 10, "the backlog never ends");
        }
        let avail: u16 = mem.read_obj(GuestAddress(tq.avail_ring() + 2)).unwrap();
        assert_eq!(tq.used_idx(), avail);
        assert!(!rng.is_broken());
    }
}
