//! A driver that refills the request queue from another vCPU as fast as the device empties it
//! cannot keep the event loop: one notification serves a bounded number of requests, and the
//! device asks for another turn for the rest.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{GetattrIn, InHeader, Opcode};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

use super::*;
use crate::virtio::fs::device::CHAINS_PER_EVENT;

/// Publishes descriptor head 0 on the ring whose index field is at `avail + 2`, at most `room`
/// entries ahead of the used index at `used + 2`; returns the new avail index.
fn top_up(mem: &GuestMem, avail: GuestAddress, used: GuestAddress, mut idx: u16) -> u16 {
    let done: u16 = mem.read_obj(used.unchecked_add(2)).expect("used idx");
    while idx.wrapping_sub(done) < QSIZE {
        let slot = avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE));
        mem.write_obj(0u16, slot).expect("avail slot");
        idx = idx.wrapping_add(1);
        mem.write_obj(idx, avail.unchecked_add(2))
            .expect("avail idx");
    }
    idx
}

/// The device's host fds that are ready now.
fn ready_fds(dev: &VirtioFs) -> Vec<RawFd> {
    let ep = Epoll::new().expect("epoll");
    for (fd, ev) in dev.host_fds() {
        ep.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, fd as u64))
            .expect("epoll add");
    }
    let mut evs = [EpollEvent::default(); 8];
    let n = ep.wait(0, &mut evs).expect("epoll wait");
    evs[..n].iter().map(|e| e.fd()).collect()
}

#[test]
fn a_request_queue_refilled_from_another_vcpu_returns_to_the_event_loop_after_the_budget() {
    let mut h = Harness::new(false);
    // One GETATTR of the root in descriptors 0 and 1, made available over and over.
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<GetattrIn>()) as u32,
        opcode: Opcode::Getattr as u32,
        unique: 7,
        nodeid: ROOT,
        pid: 1,
        ..Default::default()
    };
    let input = [header.as_slice(), GetattrIn::default().as_slice()].concat();
    h.mem
        .write_slice(&input, GuestAddress(IN_ADDR))
        .expect("request");
    let (table, avail, used) = h.rings[REQUEST];
    let descs = [
        SplitDescriptor::new(IN_ADDR, input.len() as u32, VRING_DESC_F_NEXT, 1),
        SplitDescriptor::new(OUT_ADDR, OUT_LEN, VRING_DESC_F_WRITE, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        h.mem
            .write_obj(RawDescriptor::from(*d), table.unchecked_add(16 * i as u64))
            .expect("descriptor");
    }
    let start: u16 = h.mem.read_obj(used.unchecked_add(2)).expect("used idx");
    let avail_start: u16 = h.mem.read_obj(avail.unchecked_add(2)).expect("avail idx");
    // The ring starts full, and the second vCPU keeps it full.
    let first = top_up(&h.mem, avail, used, avail_start);
    let stop = Arc::new(AtomicBool::new(false));
    let refill = {
        let (mem, stop) = (h.mem.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut idx = first;
            while !stop.load(Ordering::Relaxed) && idx.wrapping_sub(avail_start) < 8 * QSIZE {
                idx = top_up(&mem, avail, used, idx);
                std::hint::spin_loop();
            }
            idx
        })
    };

    h.dev.process_queue(REQUEST);
    let after: u16 = h.mem.read_obj(used.unchecked_add(2)).expect("used idx");
    stop.store(true, Ordering::Relaxed);
    let published = refill.join().expect("refill thread");
    assert_eq!(
        usize::from(after.wrapping_sub(start)),
        CHAINS_PER_EVENT,
        "one notification served {} requests",
        after.wrapping_sub(start)
    );
    assert!(!h.dev.is_broken());

    // The device asked the event loop for another turn; turns finish the queue, then it is
    // quiet.
    let mut turns = 0;
    loop {
        let ready = ready_fds(&h.dev);
        if ready.is_empty() {
            break;
        }
        for fd in ready {
            h.dev
                .process_host_event(fd, vmm_sys_util::epoll::EventSet::IN);
        }
        turns += 1;
        assert!(turns < 1000, "the device keeps asking for turns");
    }
    let done: u16 = h.mem.read_obj(used.unchecked_add(2)).expect("used idx");
    assert_eq!(done, published, "every request was answered");
    let expected = usize::from(published.wrapping_sub(after)).div_ceil(CHAINS_PER_EVENT);
    assert!(turns >= expected, "{turns} turns for {expected} budgets");
    // The device still answers normally.
    assert_eq!(h.getattr(ROOT).error, 0);
}
