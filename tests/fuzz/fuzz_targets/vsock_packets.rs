//! virtio-vsock: well-formed chains carrying arbitrary packets (headers built from fuzzed fields,
//! a correct or fuzzed `len`), rx buffers posted now and then, and a host side that listens on the
//! guest's connect port, connects with `CONNECT <port>` lines and writes data, driven as the
//! event loop drives it.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};

use arbitrary::Arbitrary;
use kiln_devices::virtio::vsock::{Vsock, RX_QUEUE, TX_QUEUE};
use kiln_devices::virtio::VirtioDevice;
use kiln_fuzz::{scratch, Driver};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::epoll::EventSet;

const TX_BUF: u64 = 0x2_0000;
const RX_BUF: u64 = 0x4_0000;
const HEADER: usize = 44;
/// The host listens here (`<uds>_1234`) for guest-initiated connections.
const HOST_PORT: u32 = 1234;

#[derive(Arbitrary, Debug)]
enum Step {
    Tx {
        src_port: u16,
        /// Small values pick well-known ports; the rest are used as they are.
        dst_port: u32,
        op: u8,
        ty: u8,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        /// Anything but 0 replaces the right CIDs (guest 3 → host 2) with fuzzed ones.
        cids: Option<(u64, u64)>,
        len: Option<u32>,
        payload: Vec<u8>,
        split: Option<u8>,
    },
    /// Post `n` rx buffers of `size` bytes.
    Rx { n: u8, size: u16 },
    /// Host connects to the device's socket and writes `line` (a `CONNECT <port>\n` or junk).
    HostConnect { port: Option<u32>, junk: Vec<u8> },
    /// Host writes into its `i`th stream.
    HostWrite { i: u8, data: Vec<u8> },
    /// Host closes its `i`th stream.
    HostClose { i: u8 },
    /// Host accepts pending guest-initiated connections.
    Accept,
    /// The event loop reports every host fd ready.
    HostEvents,
}

fn dst(port: u32) -> u32 {
    match port {
        0 => HOST_PORT,
        1 => 1024,
        p => p,
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let dir = scratch();
    let uds = dir.path().join("v.sock");
    let mut dev = Vsock::new(&uds, 3).expect("vsock device");
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let Some(mut d) = Driver::activate(&mut dev, 3) else {
        return;
    };
    let mut streams: Vec<UnixStream> = Vec::new();
    for step in steps.into_iter().take(128) {
        match step {
            Step::Tx {
                src_port,
                dst_port,
                op,
                ty,
                flags,
                buf_alloc,
                fwd_cnt,
                cids,
                len,
                payload,
                split,
            } => {
                let (src_cid, dst_cid) = cids.unwrap_or((3, 2));
                let payload = &payload[..payload.len().min(16 << 10)];
                let mut pkt = Vec::with_capacity(HEADER + payload.len());
                pkt.extend_from_slice(&src_cid.to_le_bytes());
                pkt.extend_from_slice(&dst_cid.to_le_bytes());
                pkt.extend_from_slice(&u32::from(src_port).to_le_bytes());
                pkt.extend_from_slice(&dst(dst_port).to_le_bytes());
                pkt.extend_from_slice(&len.unwrap_or(payload.len() as u32).to_le_bytes());
                pkt.extend_from_slice(&u16::from(ty.max(1) % 4).to_le_bytes());
                pkt.extend_from_slice(&u16::from(op % 9).to_le_bytes());
                pkt.extend_from_slice(&flags.to_le_bytes());
                pkt.extend_from_slice(&buf_alloc.to_le_bytes());
                pkt.extend_from_slice(&fwd_cnt.to_le_bytes());
                pkt.extend_from_slice(payload);
                d.write(TX_BUF, &pkt);
                let total = pkt.len() as u32;
                match split.map(u32::from).filter(|&s| s > 0 && s < total) {
                    Some(s) => {
                        d.publish(
                            TX_QUEUE,
                            &[
                                (TX_BUF, s, false),
                                (TX_BUF + u64::from(s), total - s, false),
                            ],
                        );
                    }
                    None => {
                        d.publish(TX_QUEUE, &[(TX_BUF, total, false)]);
                    }
                }
                kiln_fuzz::notify(&mut dev, TX_QUEUE);
            }
            Step::Rx { n, size } => {
                for i in 0..u64::from(n % 16) {
                    d.publish(
                        RX_QUEUE,
                        &[(RX_BUF + i * 0x1_0000 % 0x8_0000, u32::from(size), true)],
                    );
                }
                kiln_fuzz::notify(&mut dev, RX_QUEUE);
            }
            Step::HostConnect { port, junk } => {
                if streams.len() < 8 {
                    if let Ok(mut s) = UnixStream::connect(&uds) {
                        let _ = s.set_nonblocking(true);
                        let _ = match port {
                            Some(p) => s.write_all(format!("CONNECT {}\n", dst(p)).as_bytes()),
                            None => s.write_all(&junk[..junk.len().min(64)]),
                        };
                        streams.push(s);
                    }
                }
            }
            Step::HostWrite { i, data } => {
                let n = streams.len().max(1);
                if let Some(s) = streams.get_mut(usize::from(i) % n) {
                    let _ = s.write(&data[..data.len().min(16 << 10)]);
                }
            }
            Step::HostClose { i } => {
                if !streams.is_empty() {
                    streams.remove(usize::from(i) % streams.len());
                }
            }
            Step::Accept => {
                while let Ok((s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(true);
                    if streams.len() < 8 {
                        streams.push(s);
                    }
                }
            }
            Step::HostEvents => {
                for (fd, _) in dev.host_fds() {
                    dev.process_host_event(fd, EventSet::IN | EventSet::OUT);
                }
            }
        }
    }
    dev.stop();
});
