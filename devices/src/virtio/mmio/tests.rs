//! Tests of the virtio-mmio transport: a driver talking to it through registers only.

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::rng::Rng;
use crate::virtio::testing::{guest_memory, interrupt, signal_count, Desc, MmioDriver, TestQueue};
use crate::virtio::{device_type, ActivateError, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

const MEM_SIZE: usize = 0x10_0000;
const RUNNING: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

/// What the test device saw, shared with the test after the device is boxed.
#[derive(Default)]
struct Seen {
    activations: Vec<Vec<bool>>,
    notified: Vec<usize>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
}

/// A two-queue device whose behaviour the test chooses.
struct TestDevice {
    seen: Arc<Mutex<Seen>>,
    fail_activate: bool,
    fail_reset: bool,
    break_on_notify: bool,
    broken: bool,
}

impl TestDevice {
    fn new() -> (Self, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let dev = Self {
            seen: seen.clone(),
            fail_activate: false,
            fail_reset: false,
            break_on_notify: false,
            broken: false,
        };
        (dev, seen)
    }
}

const TEST_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1 << 3;

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn features(&self) -> u64 {
        TEST_FEATURES | 1 << 34
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = [0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i).copied())
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.seen
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMem,
        queues: Vec<Queue>,
        _interrupt: Interrupt,
        _acked: u64,
    ) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Backend("test says no".into()));
        }
        let ready = queues.iter().map(|q| q.ready()).collect();
        self.seen.lock().unwrap().activations.push(ready);
        Ok(())
    }
    fn process_queue(&mut self, index: usize) {
        self.seen.lock().unwrap().notified.push(index);
        self.broken |= self.break_on_notify;
    }
    fn reset(&mut self) -> bool {
        self.seen.lock().unwrap().resets += 1;
        !self.fail_reset
    }
    fn is_broken(&self) -> bool {
        self.broken
    }
}

fn transport(device: impl VirtioDevice + 'static) -> (MmioTransport, GuestMem, Interrupt) {
    let mem = guest_memory(MEM_SIZE);
    let irq = interrupt();
    let t = MmioTransport::new(Box::new(device), mem.clone(), irq.clone());
    (t, mem, irq)
}

/// Negotiates, sets up queue 0 from `tq` and sets DRIVER_OK; returns the final status.
fn bring_up(t: &mut MmioTransport, features: u64, tq: &TestQueue) -> u32 {
    let mut d = MmioDriver::new(t);
    assert_ne!(d.negotiate(features) & FEATURES_OK, 0);
    d.setup_queue(0, tq);
    d.driver_ok()
}

#[test]
fn driver_handshake_through_registers_serves_a_request() {
    let (mut t, mem, irq) = transport(Rng::new());
    let mut d = MmioDriver::new(&mut t);
    assert_eq!(d.read(regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.read(regs::VERSION), 2);
    assert_eq!(d.read(regs::DEVICE_ID), device_type::RNG);
    assert_eq!(d.read(regs::VENDOR_ID), VENDOR_ID);
    let offered = d.device_features();
    assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
    // VERSION_1 is bit 32: accepting it exercises the second DriverFeaturesSel page.
    assert_eq!(
        d.negotiate(VIRTIO_F_VERSION_1),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
    d.write(regs::QUEUE_SEL, 0);
    assert_eq!(d.read(regs::QUEUE_NUM_MAX), 256);
    assert_eq!(d.read(regs::QUEUE_READY), 0);
    let mut tq = TestQueue::new(&mem, 0x1000, 16);
    d.setup_queue(0, &tq);
    assert_eq!(d.read(regs::QUEUE_READY), 1);
    assert_eq!(d.driver_ok(), RUNNING);
    assert!(t.is_activated());

    let head = tq.add_chain(&[Desc::writable(0x8000, 64)]);
    let mut d = MmioDriver::new(&mut t);
    d.write(regs::QUEUE_NOTIFY, 0);
    assert_eq!(tq.used_idx(), 1);
    assert_eq!(tq.used(0), (u32::from(head), 64));
    assert_eq!(d.read(regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    assert_eq!(signal_count(&irq), 1);
    d.write(regs::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(d.read(regs::INTERRUPT_STATUS), 0);
}

#[test]
fn features_ok_is_refused_for_unoffered_features_or_missing_version_1() {
    for features in [
        VIRTIO_F_VERSION_1 | 1 << 5,
        VIRTIO_F_VERSION_1 | 1 << 63,
        // Offered by the device but masked by the transport (packed ring).
        VIRTIO_F_VERSION_1 | 1 << 34,
        1 << 3,
        0,
    ] {
        let (dev, seen) = TestDevice::new();
        let (mut t, _, _) = transport(dev);
        let mut d = MmioDriver::new(&mut t);
        assert_eq!(d.negotiate(features), ACKNOWLEDGE | DRIVER, "{features:#x}");
        assert_eq!(d.driver_ok(), ACKNOWLEDGE | DRIVER);
        assert!(!t.is_activated());
        assert!(seen.lock().unwrap().activations.is_empty());
    }
    // A non-zero page beyond the 64 defined feature bits is refused too.
    let (dev, _) = TestDevice::new();
    let (mut t, _, _) = transport(dev);
    let mut d = MmioDriver::new(&mut t);
    d.write(regs::STATUS, ACKNOWLEDGE);
    d.write(regs::STATUS, ACKNOWLEDGE | DRIVER);
    d.write(regs::DRIVER_FEATURES_SEL, 1);
    d.write(regs::DRIVER_FEATURES, 1);
    d.write(regs::DRIVER_FEATURES_SEL, 2);
    d.write(regs::DRIVER_FEATURES, 1);
    d.write(regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(d.read(regs::STATUS), ACKNOWLEDGE | DRIVER);
    // The offered set hides what the transport cannot do.
    assert_eq!(d.device_features(), TEST_FEATURES);
}

#[test]
fn invalid_queues_set_needs_reset_instead_of_activating() {
    let cases: [(u32, u64, u64, u64); 6] = [
        (16, MEM_SIZE as u64, 0x2000, 0x3000), // descriptor table outside memory
        (16, 0x1000, 0x2000, MEM_SIZE as u64 - 8), // used ring runs past the end
        (12, 0x1000, 0x2000, 0x3000),          // size not a power of two
        (32, 0x1000, 0x2000, 0x3000),          // size above QueueNumMax
        (16, 0x1008, 0x2000, 0x3000),          // descriptor table not 16-byte aligned
        (16, 0x1000, 0x2000, 0x3002),          // used ring not 4-byte aligned
    ];
    for (size, desc, driver, device) in cases {
        let (dev, seen) = TestDevice::new();
        let (mut t, _, irq) = transport(dev);
        let mut d = MmioDriver::new(&mut t);
        d.negotiate(VIRTIO_F_VERSION_1);
        d.setup_queue_at(0, size, desc, driver, device);
        let s = d.driver_ok();
        assert_eq!(
            s,
            RUNNING | DEVICE_NEEDS_RESET,
            "{size} {desc:#x} {device:#x}"
        );
        assert_eq!(d.read(regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        d.write(regs::QUEUE_NOTIFY, 0);
        assert!(!t.is_activated());
        assert_eq!(signal_count(&irq), 1);
        let seen = seen.lock().unwrap();
        assert!(seen.activations.is_empty() && seen.notified.is_empty());
    }
}

#[test]
fn activation_failure_sets_needs_reset_and_unused_queues_arrive_not_ready() {
    let (mut dev, _) = TestDevice::new();
    dev.fail_activate = true;
    let (mut t, mem, _) = transport(dev);
    let tq = TestQueue::new(&mem, 0x1000, 16);
    assert_eq!(
        bring_up(&mut t, VIRTIO_F_VERSION_1, &tq),
        RUNNING | DEVICE_NEEDS_RESET
    );

    let (dev, seen) = TestDevice::new();
    let (mut t, _, _) = transport(dev);
    assert_eq!(bring_up(&mut t, VIRTIO_F_VERSION_1, &tq), RUNNING);
    assert_eq!(seen.lock().unwrap().activations, vec![vec![true, false]]);
    // Queue 1 was never enabled: notifying it (or a queue that does not exist) is dropped.
    t.notify(1);
    t.notify(7);
    t.notify(0);
    assert_eq!(seen.lock().unwrap().notified, vec![0]);
}

#[test]
fn reset_clears_status_queues_features_and_interrupts() {
    let (dev, seen) = TestDevice::new();
    let (mut t, mem, irq) = transport(dev);
    let tq = TestQueue::new(&mem, 0x1000, 16);
    bring_up(&mut t, TEST_FEATURES, &tq);
    irq.signal_used_queue();
    let mut d = MmioDriver::new(&mut t);
    d.write(regs::STATUS, 0);
    assert_eq!(d.read(regs::STATUS), 0);
    assert_eq!(d.read(regs::INTERRUPT_STATUS), 0);
    d.write(regs::QUEUE_SEL, 0);
    assert_eq!(d.read(regs::QUEUE_READY), 0);
    assert!(!t.is_activated());
    assert_eq!(seen.lock().unwrap().resets, 1);
    t.notify(0);
    assert!(seen.lock().unwrap().notified.is_empty());

    // Features accepted before the reset are forgotten: VERSION_1 alone must be re-accepted.
    let mut d = MmioDriver::new(&mut t);
    d.write(regs::STATUS, ACKNOWLEDGE);
    d.write(regs::STATUS, ACKNOWLEDGE | DRIVER);
    d.write(regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(d.read(regs::STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(bring_up(&mut t, VIRTIO_F_VERSION_1, &tq), RUNNING);
    assert_eq!(seen.lock().unwrap().activations.len(), 2);
}

#[test]
fn a_device_that_cannot_reset_stays_failed() {
    let (mut dev, _) = TestDevice::new();
    dev.fail_reset = true;
    let (mut t, mem, _) = transport(dev);
    let tq = TestQueue::new(&mem, 0x1000, 16);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &tq);
    let mut d = MmioDriver::new(&mut t);
    d.write(regs::STATUS, 0);
    assert_eq!(d.read(regs::STATUS), RUNNING | DEVICE_NEEDS_RESET);
    d.write(regs::STATUS, ACKNOWLEDGE);
    assert_eq!(d.read(regs::STATUS), RUNNING | DEVICE_NEEDS_RESET);
}

#[test]
fn a_broken_device_gets_needs_reset_and_a_config_interrupt() {
    let (mut dev, seen) = TestDevice::new();
    dev.break_on_notify = true;
    let (mut t, mem, irq) = transport(dev);
    let tq = TestQueue::new(&mem, 0x1000, 16);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &tq);
    let mut d = MmioDriver::new(&mut t);
    d.write(regs::QUEUE_NOTIFY, 0);
    assert_eq!(d.read(regs::STATUS), RUNNING | DEVICE_NEEDS_RESET);
    assert_eq!(d.read(regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(signal_count(&irq), 1);
    d.write(regs::QUEUE_NOTIFY, 0);
    assert_eq!(seen.lock().unwrap().notified, vec![0]);
}

#[test]
fn status_steps_cannot_be_skipped_or_undone() {
    let (dev, _) = TestDevice::new();
    let (mut t, _, _) = transport(dev);
    let mut d = MmioDriver::new(&mut t);
    for (write, expect) in [
        (DRIVER_OK, 0),
        (ACKNOWLEDGE | DRIVER, 0),
        (ACKNOWLEDGE, ACKNOWLEDGE),
        (ACKNOWLEDGE | FEATURES_OK, ACKNOWLEDGE),
        (ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER),
        (DRIVER, ACKNOWLEDGE | DRIVER),
        (
            ACKNOWLEDGE | DRIVER | DEVICE_NEEDS_RESET,
            ACKNOWLEDGE | DRIVER,
        ),
        (ACKNOWLEDGE | DRIVER | FAILED, ACKNOWLEDGE | DRIVER | FAILED),
        (
            ACKNOWLEDGE | DRIVER | FAILED | FEATURES_OK,
            ACKNOWLEDGE | DRIVER | FAILED,
        ),
    ] {
        d.write(regs::STATUS, write);
        assert_eq!(d.read(regs::STATUS), expect, "after writing {write:#x}");
    }
}

#[test]
fn register_access_rules() {
    let (dev, seen) = TestDevice::new();
    let (mut t, mem, _) = transport(dev);
    let mut d = MmioDriver::new(&mut t);
    // Writes to read-only registers are ignored; unknown offsets read zero.
    d.write(regs::MAGIC_VALUE, 0);
    d.write(regs::QUEUE_NUM_MAX, 1);
    assert_eq!(d.read(regs::MAGIC_VALUE), MAGIC_VALUE);
    for off in [
        0x018,
        0x0c0,
        0x0f8,
        0x0fd,
        regs::QUEUE_NUM,
        regs::CONFIG_GENERATION,
    ] {
        assert_eq!(d.read(off), 0, "{off:#x}");
    }
    for off in [regs::SHM_LEN_LOW, regs::SHM_LEN_HIGH] {
        assert_eq!(d.read(off), u32::MAX);
    }
    // Queue registers: QueueNumMax per queue, zero past the last queue.
    for (sel, max) in [(0, 16), (1, 8), (2, 0), (u32::MAX, 0)] {
        d.write(regs::QUEUE_SEL, sel);
        assert_eq!(d.read(regs::QUEUE_NUM_MAX), max);
    }
    // Queue setup before FEATURES_OK is ignored.
    d.write(regs::QUEUE_SEL, 0);
    d.write(regs::QUEUE_READY, 1);
    assert_eq!(d.read(regs::QUEUE_READY), 0);
    // Non-4-byte register accesses read zero and write nothing.
    let mut half = [0xffu8; 2];
    d.transport.read(regs::MAGIC_VALUE, &mut half);
    assert_eq!(half, [0, 0]);
    d.transport.write(regs::STATUS, &[ACKNOWLEDGE as u8]);
    d.transport
        .write(regs::STATUS, &u64::from(ACKNOWLEDGE).to_le_bytes());
    assert_eq!(d.read(regs::STATUS), 0);
    // Config space: any width, forwarded with the offset inside the config space.
    let mut two = [0u8; 2];
    d.transport.read(regs::CONFIG + 1, &mut two);
    assert_eq!(two, [0x22, 0x33]);
    assert_eq!(d.read(regs::CONFIG + 4), 0x8877_6655);
    assert_eq!(d.read(regs::CONFIG + 0x200), 0);
    d.transport.write(regs::CONFIG + 3, &[9]);
    assert_eq!(seen.lock().unwrap().config_writes, vec![(3, vec![9])]);

    // Once a queue is enabled, its size and addresses are frozen until reset.
    let tq = TestQueue::new(&mem, 0x1000, 16);
    let mut d = MmioDriver::new(&mut t);
    d.negotiate(VIRTIO_F_VERSION_1);
    d.setup_queue(0, &tq);
    d.write(regs::QUEUE_DESC_LOW, 0x7777_0000);
    d.write(regs::QUEUE_NUM, 3);
    // DriverFeatures after FEATURES_OK is ignored too.
    d.write(regs::DRIVER_FEATURES_SEL, 0);
    d.write(regs::DRIVER_FEATURES, 1 << 5);
    assert_eq!(d.driver_ok(), RUNNING);
}

/// xorshift64*: deterministic pseudo-random numbers for the fuzz loop.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_register_traffic_never_panics() {
    let offsets = [
        regs::DEVICE_FEATURES_SEL,
        regs::DRIVER_FEATURES,
        regs::DRIVER_FEATURES_SEL,
        regs::QUEUE_SEL,
        regs::QUEUE_NUM,
        regs::QUEUE_READY,
        regs::QUEUE_NOTIFY,
        regs::INTERRUPT_ACK,
        regs::STATUS,
        regs::QUEUE_DESC_LOW,
        regs::QUEUE_DESC_HIGH,
        regs::QUEUE_DRIVER_LOW,
        regs::QUEUE_DRIVER_HIGH,
        regs::QUEUE_DEVICE_LOW,
        regs::QUEUE_DEVICE_HIGH,
        regs::SHM_SEL,
        regs::QUEUE_RESET,
    ];
    let statuses = [0, 1, 3, 0xb, 0xf, 0x80, 0x40];
    let (mut t, mem, _) = transport(Rng::new());
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    // Random bytes in guest memory, so that whatever queue activates walks garbage rings.
    let mut junk = vec![0u8; MEM_SIZE];
    junk.iter_mut().for_each(|b| *b = rng.next() as u8);
    mem.write_slice(&junk, GuestAddress(0)).unwrap();
    let mut active_notifies = 0;
    for i in 0..50_000 {
        if i % 200 == 0 {
            // A scripted bring-up over random (often valid) rings, so that the random
            // traffic after it also hits an active device walking garbage descriptors.
            let mut d = MmioDriver::new(&mut t);
            d.negotiate(VIRTIO_F_VERSION_1 | (rng.next() & (VIRTIO_RING_F_EVENT_IDX | 1 << 5)));
            let addr = |r: u64| (r % (MEM_SIZE as u64 - 0x2000)) & !0xf;
            let size = 1 << (rng.next() % 9);
            d.setup_queue_at(
                0,
                size,
                addr(rng.next()),
                addr(rng.next()),
                addr(rng.next()),
            );
            d.driver_ok();
            if t.is_activated() {
                active_notifies += 1;
            }
            t.notify(0);
        }
        let r = rng.next();
        let offset = match r % 8 {
            0 => (r >> 8) & 0x1fff,
            6 => regs::STATUS,
            7 => regs::QUEUE_NOTIFY,
            _ => offsets[(r >> 8) as usize % offsets.len()],
        };
        let len = [1, 2, 4, 4, 8][(r >> 24) as usize % 5];
        // Small values reach valid queue sizes, indexes and in-memory addresses.
        let value = match (r >> 32) & 3 {
            0 => rng.next(),
            // Queue indexes, small sizes, status and interrupt bits.
            1 => rng.next() % 4,
            _ if offset == regs::STATUS => statuses[(r >> 40) as usize % statuses.len()],
            _ => (rng.next() % MEM_SIZE as u64) & !0xf,
        };
        let mut data = value.to_le_bytes();
        if r & 1 << 48 == 0 {
            if offset == regs::QUEUE_NOTIFY && len == 4 && value == 0 && t.is_activated() {
                active_notifies += 1;
            }
            t.write(offset, &data[..len]);
        } else {
            t.read(offset, &mut data[..len]);
        }
    }
    assert!(
        active_notifies > 0,
        "the fuzz loop never notified an active device"
    );
}
