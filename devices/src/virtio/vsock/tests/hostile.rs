//! A guest that sends anything: every malformed packet is dropped or reset, the device keeps
//! working, never panics and never grows without bound.

use std::io::Write;
use std::os::unix::net::UnixListener;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;

use super::*;
use crate::virtio::vsock::muxer::MAX_CONTROL_BACKLOG;
use crate::virtio::vsock::{CONN_BUF_ALLOC, MAX_PKT_DATA};

/// The only packet in the rx queue is a reset for (host `src`, guest `dst`).
fn expect_rst(h: &mut Harness, src: u32, dst: u32) {
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let r = pkts[0].hdr;
    assert_eq!(
        (r.op, r.src_port, r.dst_port, r.src_cid, r.dst_cid),
        (op::RST, src, dst, 2, 3)
    );
}

/// The device still serves a normal guest connection afterwards.
fn still_works(h: &mut Harness) {
    h.recv();
    let (mut s, hp) = h.established_from_host(4242);
    h.send(g2h(4242, hp, op::RW), b"ok");
    assert_eq!(read_n(&mut s, 2), b"ok");
    assert!(!h.dev.is_broken());
}

#[test]
fn unknown_op_resets() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.send(g2h(10, 20, 99), &[]);
    expect_rst(&mut h, 20, 10);
    let (mut s, hp) = h.established_from_host(30);
    h.send(g2h(30, hp, 0), &[]);
    expect_rst(&mut h, hp, 30);
    assert_eof(&mut s);
    still_works(&mut h);
}

#[test]
fn len_over_the_maximum_is_reset_without_allocating() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, hp) = h.established_from_host(31);
    for len in [MAX_PKT_DATA + 1, u32::MAX] {
        h.send_raw_len(
            Header {
                len,
                ..g2h(77, 88, op::RW)
            },
            &[1; 16],
        );
        expect_rst(&mut h, 88, 77);
    }
    h.send_raw_len(
        Header {
            len: u32::MAX,
            ..g2h(31, hp, op::RW)
        },
        &[1; 16],
    );
    expect_rst(&mut h, hp, 31);
    assert_eof(&mut s);
    still_works(&mut h);
}

#[test]
fn len_beyond_the_descriptor_is_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, hp) = h.established_from_host(32);
    h.send_raw_len(
        Header {
            len: 1000,
            ..g2h(32, hp, op::RW)
        },
        &[7; 10],
    );
    expect_rst(&mut h, hp, 32);
    assert_eof(&mut s);
    // A header claiming data with no data descriptor at all.
    h.send_raw_len(
        Header {
            len: 5,
            ..g2h(1, 2, op::RW)
        },
        &[],
    );
    expect_rst(&mut h, 2, 1);
    still_works(&mut h);
}

#[test]
fn wrong_cids_are_dropped() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, hp) = h.established_from_host(33);
    h.send(
        Header {
            src_cid: 4,
            ..g2h(33, hp, op::RW)
        },
        b"spoofed",
    );
    h.send(
        Header {
            dst_cid: 7,
            ..g2h(33, hp, op::RW)
        },
        b"elsewhere",
    );
    h.send(
        Header {
            src_cid: u64::MAX,
            ..g2h(33, hp, op::RST)
        },
        &[],
    );
    assert!(h.recv().is_empty());
    assert_eq!(h.dev.connection_count(), 1);
    h.send(g2h(33, hp, op::RW), b"real");
    assert_eq!(
        read_n(&mut s, 4),
        b"real",
        "the spoofed bytes never reached the host"
    );
}

#[test]
fn non_stream_types_are_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let _listener = UnixListener::bind(format!("{}_40", h.uds.display())).expect("listen");
    for type_ in [0u16, 2, 0xffff] {
        h.send(
            Header {
                type_,
                ..g2h(41, 40, op::REQUEST)
            },
            &[],
        );
        expect_rst(&mut h, 40, 41);
    }
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_are_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    for o in [
        op::RESPONSE,
        op::SHUTDOWN,
        op::RW,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
    ] {
        h.send(g2h(50, 51, o), b"x");
        expect_rst(&mut h, 51, 50);
    }
    h.send(g2h(50, 51, op::RST), &[]);
    assert!(h.recv().is_empty(), "never answer a reset with a reset");
    // Port "any" as a source port.
    let _listener = UnixListener::bind(format!("{}_52", h.uds.display())).expect("listen");
    h.send(g2h(u32::MAX, 52, op::REQUEST), &[]);
    expect_rst(&mut h, 52, u32::MAX);
}

#[test]
fn out_of_state_packets_reset_the_connection() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    // Data before the guest accepted a host connection.
    let mut s = h.host_connect(60);
    let hp = h.recv()[0].hdr.src_port;
    h.send(g2h(60, hp, op::RW), b"early");
    expect_rst(&mut h, hp, 60);
    assert_eof(&mut s);
    // A second REQUEST, then a RESPONSE, on an established connection.
    for o in [op::REQUEST, op::RESPONSE] {
        let (mut s, hp) = h.established_from_host(61);
        h.send(g2h(61, hp, o), &[]);
        expect_rst(&mut h, hp, 61);
        assert_eof(&mut s);
    }
    // Data after the guest promised to send no more.
    let (mut s, hp) = h.established_from_host(62);
    h.send(
        Header {
            flags: 2,
            ..g2h(62, hp, op::SHUTDOWN)
        },
        &[],
    );
    h.send(g2h(62, hp, op::RW), b"more");
    expect_rst(&mut h, hp, 62);
    assert_eof(&mut s);
}

#[test]
fn descriptors_outside_guest_memory_are_rejected() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let far = 0xffff_ffff_0000u64;
    // Tx header outside memory: nothing readable, dropped.
    let i = h.tx.take_desc();
    h.tx.add_raw(&[i], &[SplitDescriptor::new(far, 44, 0, 0)]);
    // Tx data outside memory: the header is readable, so the guest gets a reset.
    let (a, b) = (h.tx.take_desc(), h.tx.take_desc());
    mem.write_slice(
        &Header {
            len: 8,
            ..g2h(70, 71, op::RW)
        }
        .to_bytes(),
        h.tx.buf(a),
    )
    .expect("hdr");
    h.tx.add_raw(
        &[a, b],
        &[
            SplitDescriptor::new(h.tx.buf(a).0, 44, VRING_DESC_F_NEXT as u16, b),
            SplitDescriptor::new(far, 8, 0, 0),
        ],
    );
    // A header straddling the end of memory.
    let c = h.tx.take_desc();
    h.tx.add_raw(
        &[c],
        &[SplitDescriptor::new(MEM_SIZE as u64 - 20, 44, 0, 0)],
    );
    h.dev.process_queue(crate::virtio::vsock::TX_QUEUE);
    h.reclaim_tx();
    assert_eq!(h.tx_used, 3);
    expect_rst(&mut h, 71, 70);
    still_works(&mut h);
}

#[test]
fn bad_rx_buffers_are_returned_empty_and_skipped() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem);
    h.activate();
    let far = 0xffff_ffff_0000u64;
    let w = VRING_DESC_F_WRITE as u16;
    let n = VRING_DESC_F_NEXT as u16;
    let bad: Vec<Vec<SplitDescriptor>> = vec![
        vec![SplitDescriptor::new(far, 4096, w, 0)], // outside memory
        vec![SplitDescriptor::new(RX_BUFS, 4096, 0, 0)], // device-readable
        vec![SplitDescriptor::new(RX_BUFS, 44, w, 0)], // no room for data
        vec![SplitDescriptor::new(RX_BUFS, 10, w, 0)], // no room for a header
    ];
    for chain in &bad {
        let idx: Vec<u16> = chain.iter().map(|_| h.rx.take_desc()).collect();
        h.rx.add_raw(&idx, chain);
    }
    // A data descriptor longer than the maximum packet.
    let (a, b) = (h.rx.take_desc(), h.rx.take_desc());
    h.rx.add_raw(
        &[a, b],
        &[
            SplitDescriptor::new(h.rx.buf(a).0, 44, w | n, b),
            SplitDescriptor::new(h.rx.buf(b).0, MAX_PKT_DATA + 1, w, 0),
        ],
    );
    h.give_rx(4);
    h.send(g2h(1, 2, op::RW), b"x");
    expect_rst(&mut h, 2, 1);
    assert_eq!(h.rx_rejected, 5);
    assert!(!h.dev.is_broken());
}

#[test]
fn looping_and_indirect_chains_do_not_hang() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let n = VRING_DESC_F_NEXT as u16;
    // A tx chain whose header descriptor points back at itself.
    let a = h.tx.take_desc();
    mem.write_slice(
        &Header {
            len: 8,
            ..g2h(80, 81, op::RW)
        }
        .to_bytes(),
        h.tx.buf(a),
    )
    .expect("hdr");
    h.tx.add_raw(&[a], &[SplitDescriptor::new(h.tx.buf(a).0, 44, n, a)]);
    // Two descriptors pointing at each other.
    let (b, c) = (h.tx.take_desc(), h.tx.take_desc());
    h.tx.add_raw(
        &[b, c],
        &[
            SplitDescriptor::new(h.tx.buf(b).0, 44, n, c),
            SplitDescriptor::new(h.tx.buf(c).0, 44, n, b),
        ],
    );
    // An indirect descriptor (not negotiated) pointing at garbage.
    let d = h.tx.take_desc();
    h.tx.add_raw(
        &[d],
        &[SplitDescriptor::new(
            0xdead_0000,
            16 * 4,
            VRING_DESC_F_INDIRECT as u16,
            0,
        )],
    );
    // A next index past the table.
    let e = h.tx.take_desc();
    h.tx.add_raw(&[e], &[SplitDescriptor::new(h.tx.buf(e).0, 44, n, 999)]);
    h.dev.process_queue(crate::virtio::vsock::TX_QUEUE);
    h.reclaim_tx();
    assert_eq!(h.tx_used, 4);
    // A looping rx chain is usable at most once.
    let r = h.rx.take_desc();
    h.rx.add_raw(
        &[r],
        &[SplitDescriptor::new(
            h.rx.buf(r).0,
            44,
            VRING_DESC_F_WRITE as u16 | n,
            r,
        )],
    );
    h.recv();
    still_works(&mut h);
}

#[test]
fn bogus_avail_index_does_not_hang_or_panic() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.tx.set_avail_idx(h.tx.avail_idx.wrapping_add(1000));
    h.dev.process_queue(crate::virtio::vsock::TX_QUEUE);
    h.rx.set_avail_idx(h.rx.avail_idx.wrapping_add(1000));
    h.dev.process_queue(crate::virtio::vsock::RX_QUEUE);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn reset_flood_without_rx_buffers_is_bounded() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem);
    h.activate();
    let total = MAX_CONTROL_BACKLOG + 40;
    for i in 0..total as u32 {
        h.send(g2h(1000 + i, 1, op::RW), &[]);
    }
    assert_eq!(
        h.tx_used, MAX_CONTROL_BACKLOG,
        "tx pauses while resets back up"
    );
    let mut rsts = 0;
    h.give_rx(64);
    for _ in 0..10 {
        // recv() reposts every buffer it takes.
        rsts += h.recv().iter().filter(|p| p.hdr.op == op::RST).count();
        h.reclaim_tx();
    }
    assert_eq!((rsts, h.tx_used), (total, total));
}

#[test]
fn guest_ignoring_credit_is_reset_before_memory_grows() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, hp) = h.established_from_host(90);
    let chunk = vec![0u8; MAX_PKT_DATA as usize];
    let mut sent = 0usize;
    let limit = 64 * chunk.len();
    while sent < limit {
        h.send(g2h(90, hp, op::RW), &chunk);
        sent += chunk.len();
        if h.dev.connection_count() == 0 {
            break;
        }
    }
    assert_eq!(
        h.dev.connection_count(),
        0,
        "sent {sent} bytes without a reset"
    );
    assert!(
        sent > CONN_BUF_ALLOC as usize,
        "reset only past the advertised buffer"
    );
    let pkts = h.recv();
    assert_eq!(pkts.last().map(|p| p.hdr.op), Some(op::RST));
    drop(s.flush());
}

#[test]
fn bad_connect_lines_close_the_host_stream() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let long = format!("CONNECT {}\n", "1".repeat(40));
    for line in [
        "HELLO\n",
        "CONNECT\n",
        "CONNECT abc\n",
        "CONNECT -1\n",
        "CONNECT 99999999999\n",
        &long,
    ] {
        let mut s = UnixStream::connect(&h.uds).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(line.as_bytes()).expect("write");
        h.pump();
        assert_eof(&mut s);
    }
    assert_eq!(h.dev.connection_count(), 0);
    assert!(h.recv().is_empty());
}

#[test]
fn silent_host_connections_are_bounded() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let streams: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&h.uds).expect("connect"))
        .collect();
    h.pump();
    // The listener, the device's own kick, and at most 64 handshakes.
    assert!(
        h.dev.host_fds().len() <= 2 + 64,
        "{} fds",
        h.dev.host_fds().len()
    );
    drop(streams);
    h.pump();
    assert_eq!(h.dev.host_fds().len(), 2);
}

#[test]
fn a_tx_queue_refilled_from_another_vcpu_returns_to_the_event_loop_after_the_budget() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use crate::virtio::vsock::device::CHAINS_PER_EVENT;

    let mem = test_mem();
    let mut h = Harness::new(&mem);
    // A packet for another CID: dropped without an answer, so only tx moves.
    let d = h.tx.take_desc();
    let hdr = Header {
        dst_cid: 99,
        ..g2h(1234, 5000, op::REQUEST)
    };
    mem.write_slice(&hdr.to_bytes(), h.tx.buf(d))
        .expect("header");
    let desc = SplitDescriptor::new(h.tx.buf(d).0, HEADER_SIZE as u32, 0, 0);
    mem.write_obj(
        RawDescriptor::from(desc),
        h.tx.desc.unchecked_add(16 * u64::from(d)),
    )
    .expect("descriptor");
    let (avail, used) = (h.tx.avail, h.tx.used);
    let top_up = move |mem: &GuestMem, mut idx: u16| -> u16 {
        let done: u16 = mem.read_obj(used.unchecked_add(2)).expect("used idx");
        while idx.wrapping_sub(done) < QUEUE_SIZE {
            let slot = avail.unchecked_add(4 + 2 * u64::from(idx % QUEUE_SIZE));
            mem.write_obj(d, slot).expect("avail slot");
            idx = idx.wrapping_add(1);
            mem.write_obj(idx, avail.unchecked_add(2))
                .expect("avail idx");
        }
        idx
    };
    let start: u16 = mem.read_obj(used.unchecked_add(2)).expect("used idx");
    let avail_start = h.tx.avail_idx;
    // The ring starts full, and a second vCPU keeps it full.
    let first = top_up(&mem, avail_start);
    let stop = Arc::new(AtomicBool::new(false));
    let refill = {
        let (mem, stop) = (mem.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut idx = first;
            while !stop.load(Ordering::Relaxed) && idx.wrapping_sub(avail_start) < 16 * QUEUE_SIZE {
                idx = top_up(&mem, idx);
                std::hint::spin_loop();
            }
            idx
        })
    };

    h.dev.process_queue(crate::virtio::vsock::TX_QUEUE);
    let after: u16 = mem.read_obj(used.unchecked_add(2)).expect("used idx");
    stop.store(true, Ordering::Relaxed);
    let published = refill.join().expect("refill thread");
    assert_eq!(
        usize::from(after.wrapping_sub(start)),
        CHAINS_PER_EVENT,
        "one notification moved {} tx packets",
        after.wrapping_sub(start)
    );

    // The device asked the event loop for another turn; turns finish the queue.
    h.pump();
    let done: u16 = mem.read_obj(used.unchecked_add(2)).expect("used idx");
    assert_eq!(done, published, "every tx packet was taken");
    assert!(
        h.recv().is_empty(),
        "nothing answers a packet for another CID"
    );
    assert!(!h.dev.is_broken());
}

#[test]
fn host_bytes_streamed_into_a_refilled_rx_queue_return_to_the_event_loop_after_the_budget() {
    use crate::virtio::vsock::device::CHAINS_PER_EVENT;

    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, _hp) = h.established_from_host(77);
    // Twice a budget of rx buffers (the most 2-descriptor chains the ring holds), and more host
    // bytes waiting in the stream than one budget of them carries.
    h.give_rx(usize::from(QUEUE_SIZE) / 2 - 64);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    let sndbuf: libc::c_int = 1 << 20;
    // SAFETY: setsockopt reads `sndbuf` for its size; `fd` is the open host stream.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            std::ptr::addr_of!(sndbuf).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_SNDBUF");
    s.set_nonblocking(true).expect("non-blocking");
    let chunk = [0x5au8; RX_DATA as usize];
    let mut sent = 0;
    // 1.5 budgets' worth, well inside the guest's credit.
    while sent < 3 * CHAINS_PER_EVENT * RX_DATA as usize / 2 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("host write: {e}"),
        }
    }
    assert!(
        sent > CHAINS_PER_EVENT * RX_DATA as usize,
        "only {sent} bytes fit in the host stream; the test needs more than a budget"
    );
    let rx_start: u16 = mem.read_obj(h.rx.used.unchecked_add(2)).expect("used idx");
    // One host event (the stream is readable): the device moves at most one budget of rx
    // buffers.
    let ep = Epoll::new().expect("epoll");
    for (fd, ev) in h.dev.host_fds() {
        ep.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, fd as u64))
            .expect("epoll add");
    }
    let mut evs = [EpollEvent::default(); 8];
    let n = ep.wait(1000, &mut evs).expect("epoll wait");
    assert_eq!(n, 1, "only the host stream is ready");
    h.dev
        .process_host_event(evs[0].fd() as RawFd, evs[0].event_set());
    let rx_after: u16 = mem.read_obj(h.rx.used.unchecked_add(2)).expect("used idx");
    assert!(
        usize::from(rx_after.wrapping_sub(rx_start)) <= CHAINS_PER_EVENT,
        "one host event filled {} rx buffers",
        rx_after.wrapping_sub(rx_start)
    );
    let mut got = 0;
    for _ in 0..100 {
        h.pump();
        got += h.recv().iter().map(|p| p.data.len()).sum::<usize>();
        if got >= sent {
            break;
        }
    }
    assert_eq!(got, sent, "every byte reached the guest in later turns");
    drop(s);
}
