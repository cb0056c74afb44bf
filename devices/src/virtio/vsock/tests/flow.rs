//! Connections that behave: handshakes, data, credit, shutdown, many at once.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;

use super::*;
use crate::virtio::vsock::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::virtio::vsock::{VsockError, CONN_BUF_ALLOC, EPHEMERAL_PORT_BASE};
use crate::virtio::{device_type, VIRTIO_F_VERSION_1};

#[test]
fn device_identity_and_config() {
    let mem = test_mem();
    let h = Harness::inactive(&mem);
    assert_eq!(h.dev.device_type(), device_type::VSOCK);
    assert_eq!(h.dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(h.dev.features(), VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 12];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut hi = [0xffu8; 4];
    h.dev.read_config(u64::MAX - 1, &mut hi);
    assert_eq!(hi, [0; 4]);
}

#[test]
fn host_connect_handshake_then_bytes_both_ways() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let mut s = h.host_connect(52);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    let req = pkts[0].hdr;
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid, req.dst_port),
        (op::REQUEST, 2, 3, 52)
    );
    assert_eq!(req.src_port, EPHEMERAL_PORT_BASE);
    assert_eq!((req.type_, req.buf_alloc), (TYPE_STREAM, CONN_BUF_ALLOC));
    assert!(h.irq.status() & crate::virtio::VIRTIO_MMIO_INT_VRING != 0);

    h.send(g2h(52, req.src_port, op::RESPONSE), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", EPHEMERAL_PORT_BASE));

    s.write_all(b"ping").expect("host write");
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].hdr.op, pkts[0].hdr.dst_port), (op::RW, 52));
    assert_eq!(pkts[0].data, b"ping");

    h.send(g2h(52, req.src_port, op::RW), b"pong");
    assert_eq!(read_n(&mut s, 4), b"pong");
    assert_eq!(h.dev.connection_count(), 1);
}

#[test]
fn host_bytes_sent_right_after_connect_reach_the_guest() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let mut s = UnixStream::connect(&h.uds).expect("connect");
    s.write_all(b"CONNECT 7\nearly").expect("write");
    h.pump();
    let req = h.recv()[0].hdr;
    h.send(g2h(7, req.src_port, op::RESPONSE), &[]);
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].data, b"early");
}

#[test]
fn guest_refusal_closes_the_host_stream() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let mut s = h.host_connect(99);
    let req = h.recv()[0].hdr;
    h.send(g2h(99, req.src_port, op::RST), &[]);
    assert_eof(&mut s);
    assert_eq!(h.dev.connection_count(), 0);
    assert!(h.recv().is_empty(), "no reset answers a reset");
}

#[test]
fn unanswered_host_connect_times_out() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.dev.muxer.connect_timeout = Duration::from_millis(50);
    let mut s = h.host_connect(98);
    let req = h.recv()[0].hdr;
    std::thread::sleep(Duration::from_millis(60));
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].hdr.op, pkts[0].hdr.src_port, pkts[0].hdr.dst_port),
        (op::RST, req.src_port, 98)
    );
    assert_eof(&mut s);
    assert_eq!(h.dev.connection_count(), 0);
    assert_eq!(
        h.dev.host_fds().len(),
        2,
        "timer disarmed, only the listener and the device's own kick left"
    );
}

#[test]
fn host_connect_before_the_driver_is_ready() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem);
    let _s = h.host_connect(5);
    h.activate();
    h.give_rx(4);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].hdr.op, pkts[0].hdr.dst_port), (op::REQUEST, 5));
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let listener = UnixListener::bind(format!("{}_1234", h.uds.display())).expect("listen");
    h.send(g2h(5000, 1234, op::REQUEST), &[]);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    let resp = pkts[0].hdr;
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (op::RESPONSE, 1234, 5000)
    );
    assert_eq!((resp.src_cid, resp.dst_cid), (2, 3));
    let (mut s, _) = listener.accept().expect("accept");

    h.send(g2h(5000, 1234, op::RW), b"hello");
    assert_eq!(read_n(&mut s, 5), b"hello");
    s.write_all(b"world").expect("host write");
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].hdr.op, pkts[0].hdr.dst_port), (op::RW, 5000));
    assert_eq!(pkts[0].data, b"world");
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.send(g2h(5000, 4321, op::REQUEST), &[]);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    let rst = pkts[0].hdr;
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port, rst.dst_cid),
        (op::RST, 4321, 5000, 3)
    );
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn device_stops_at_the_guest_credit_and_resumes_after_update() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let listener = UnixListener::bind(format!("{}_80", h.uds.display())).expect("listen");
    let credit = 10_000;
    h.send(
        Header {
            buf_alloc: credit,
            ..g2h(700, 80, op::REQUEST)
        },
        &[],
    );
    assert_eq!(h.recv()[0].hdr.op, op::RESPONSE);
    let (mut s, _) = listener.accept().expect("accept");
    let sent: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&sent).expect("host write");

    let mut got = Vec::new();
    let mut fwd = 0;
    for round in 0..3 {
        let rounds = h.pump();
        assert!(
            rounds < 50,
            "device spins while out of credit ({rounds} rounds)"
        );
        let pkts = h.recv();
        let data: Vec<u8> = pkts
            .iter()
            .filter(|p| p.hdr.op == op::RW)
            .flat_map(|p| p.data.clone())
            .collect();
        assert_eq!(
            data.len(),
            credit as usize,
            "round {round} gets exactly the credit"
        );
        assert_eq!(pkts.last().map(|p| p.hdr.op), Some(op::CREDIT_REQUEST));
        got.extend(data);
        // Nothing more without an update.
        h.pump();
        assert!(h.recv().is_empty());
        fwd += credit;
        h.send(
            Header {
                buf_alloc: credit,
                fwd_cnt: fwd,
                ..g2h(700, 80, op::CREDIT_UPDATE)
            },
            &[],
        );
    }
    assert_eq!(got, sent);
}

#[test]
fn guest_credit_requests_and_forwarded_bytes_earn_credit_updates() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, hp) = h.established_from_host(9);
    h.send(g2h(9, hp, op::CREDIT_REQUEST), &[]);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].hdr.op, pkts[0].hdr.fwd_cnt, pkts[0].hdr.buf_alloc),
        (op::CREDIT_UPDATE, 0, CONN_BUF_ALLOC)
    );

    // Half the buffer forwarded → an unsolicited update carrying the new fwd_cnt.
    let chunk = vec![0x5au8; 32 * 1024];
    let n = (CONN_BUF_ALLOC as usize / 2) / chunk.len() + 1;
    for _ in 0..n {
        h.send(g2h(9, hp, op::RW), &chunk);
        assert_eq!(read_n(&mut s, chunk.len()), chunk);
    }
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, op::CREDIT_UPDATE);
    assert_eq!(pkts[0].hdr.fwd_cnt as usize, n * chunk.len());
}

#[test]
fn slow_host_buffers_within_credit_and_delivers_in_order() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, hp) = h.established_from_host(11);
    let total = 2 * 1024 * 1024;
    let payload: Vec<u8> = (0..total).map(|i| (i * 7 % 256) as u8).collect();
    let (mut sent, mut peer_fwd, mut received) = (0usize, 0u32, Vec::new());
    while received.len() < total {
        // A well-behaved guest: never more than buf_alloc in flight.
        while sent < total {
            let credit = CONN_BUF_ALLOC as usize - (sent - peer_fwd as usize);
            let n = credit.min(48 * 1024).min(total - sent);
            if n == 0 {
                break;
            }
            h.send(g2h(11, hp, op::RW), &payload[sent..sent + n]);
            sent += n;
        }
        // The host reads a little, then the device drains its buffer to it.
        let mut buf = vec![0u8; 100_000];
        let n = s.read(&mut buf).expect("host read");
        received.extend_from_slice(&buf[..n]);
        h.pump();
        for p in h.recv() {
            assert_eq!(p.hdr.op, op::CREDIT_UPDATE);
            peer_fwd = p.hdr.fwd_cnt;
        }
    }
    assert_eq!(received, payload);
}

#[test]
fn guest_shuts_down_first() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, hp) = h.established_from_host(21);
    h.send(g2h(21, hp, op::RW), b"last words");
    h.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..g2h(21, hp, op::SHUTDOWN)
        },
        &[],
    );
    assert_eq!(read_n(&mut s, 10), b"last words");
    assert_eof(&mut s);
    // The other direction still flows.
    s.write_all(b"reply").expect("host write");
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts[0].data, b"reply");
    drop(s);
    h.pump();
    let ops: Vec<(u16, u32)> = h.recv().iter().map(|p| (p.hdr.op, p.hdr.flags)).collect();
    assert_eq!(ops, vec![(op::SHUTDOWN, SHUTDOWN_SEND), (op::RST, 0)]);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn host_shuts_down_first() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, hp) = h.established_from_host(22);
    s.write_all(b"request").expect("host write");
    s.shutdown(Shutdown::Write).expect("host shutdown");
    h.pump();
    let pkts = h.recv();
    let ops: Vec<u16> = pkts.iter().map(|p| p.hdr.op).collect();
    assert_eq!(ops, vec![op::RW, op::SHUTDOWN]);
    assert_eq!(pkts[0].data, b"request");
    assert_eq!(pkts[1].hdr.flags, SHUTDOWN_SEND);
    // The guest answers, then closes both ways; the device resets to finish.
    h.send(g2h(22, hp, op::RW), b"response");
    assert_eq!(read_n(&mut s, 8), b"response");
    h.send(
        Header {
            flags: SHUTDOWN_SEND | SHUTDOWN_RCV,
            ..g2h(22, hp, op::SHUTDOWN)
        },
        &[],
    );
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, op::RST);
    assert_eof(&mut s);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn guest_reset_closes_the_host_stream() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, hp) = h.established_from_host(23);
    h.send(g2h(23, hp, op::RST), &[]);
    assert_eof(&mut s);
    assert!(h.recv().is_empty());
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn host_vanishing_mid_stream_resets_the_guest() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let listener = UnixListener::bind(format!("{}_81", h.uds.display())).expect("listen");
    h.send(g2h(800, 81, op::REQUEST), &[]);
    h.recv();
    let (s, _) = listener.accept().expect("accept");
    drop(s);
    h.send(g2h(800, 81, op::RW), b"anyone?");
    h.pump();
    let ops: Vec<u16> = h.recv().iter().map(|p| p.hdr.op).collect();
    assert!(
        ops == vec![op::RST] || ops == vec![op::SHUTDOWN, op::RST] || ops == vec![op::SHUTDOWN],
        "{ops:?}"
    );
}

#[test]
fn thirty_two_concurrent_connections() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let listener = UnixListener::bind(format!("{}_90", h.uds.display())).expect("listen");
    let mut host = Vec::new();
    for i in 0..16u32 {
        host.push((h.established_from_host(100 + i), 100 + i));
    }
    let mut guest = Vec::new();
    for i in 0..16u32 {
        h.send(g2h(2000 + i, 90, op::REQUEST), &[]);
        assert_eq!(h.recv()[0].hdr.op, op::RESPONSE);
        guest.push((listener.accept().expect("accept").0, 2000 + i));
    }
    assert_eq!(h.dev.connection_count(), 32);
    for ((s, hp), gp) in host.iter_mut() {
        s.write_all(format!("to guest port {gp}").as_bytes())
            .expect("write");
        h.send(
            g2h(*gp, *hp, op::RW),
            format!("to host port {hp}").as_bytes(),
        );
    }
    for (s, gp) in guest.iter_mut() {
        s.write_all(format!("to guest port {gp}").as_bytes())
            .expect("write");
        h.send(
            g2h(*gp, 90, op::RW),
            format!("from guest port {gp}").as_bytes(),
        );
    }
    h.pump();
    let mut seen = 0;
    for p in h.recv() {
        assert_eq!(p.hdr.op, op::RW);
        assert_eq!(
            String::from_utf8_lossy(&p.data),
            format!("to guest port {}", p.hdr.dst_port)
        );
        seen += 1;
    }
    assert_eq!(seen, 32);
    for ((s, hp), _) in host.iter_mut() {
        let want = format!("to host port {hp}");
        assert_eq!(read_n(s, want.len()), want.as_bytes());
    }
    for (s, gp) in guest.iter_mut() {
        let want = format!("from guest port {gp}");
        assert_eq!(read_n(s, want.len()), want.as_bytes());
    }
}

#[test]
fn driver_reset_drops_every_connection() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut s, _) = h.established_from_host(30);
    assert!(h.dev.reset());
    assert_eq!(h.dev.connection_count(), 0);
    assert_eof(&mut s);
}

#[test]
fn socket_path_in_use_is_one_line_naming_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("busy.sock");
    std::fs::write(&path, b"").expect("create file");
    let err = Vsock::new(&path, GUEST_CID)
        .err()
        .expect("path in use must fail");
    assert!(matches!(err, VsockError::PathInUse(_)));
    let msg = err.to_string();
    assert!(
        msg.starts_with("vsock socket ") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
}

#[test]
fn socket_file_is_removed_with_the_device() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("v.sock");
    let dev = Vsock::new(&path, GUEST_CID).expect("device");
    assert!(path.exists());
    assert!(matches!(
        Vsock::new(&path, GUEST_CID),
        Err(VsockError::PathInUse(_))
    ));
    drop(dev);
    assert!(!path.exists());
}

#[test]
fn reserved_guest_cids_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        let err = Vsock::new(dir.path().join("x.sock"), cid)
            .err()
            .expect("reserved cid");
        assert!(matches!(err, VsockError::BadCid(c) if c == cid));
    }
}
