//! virtio-fs: well-formed chains carrying arbitrary FUSE requests (after a valid FUSE_INIT, unless
//! the input says not to). Headers are built from fuzzed fields with a correct or fuzzed `len`, so
//! the fuzzer spends its time in the request handlers. The share must confine them.
#![no_main]

use arbitrary::Arbitrary;
use kiln_devices::virtio::fs::VirtioFs;
use kiln_devices::virtio::VirtioDevice;
use kiln_fuzz::{Driver, Share};
use libfuzzer_sys::fuzz_target;

const REQ: u64 = 0x2_0000;
const REPLY: u64 = 0x4_0000;
const REQUEST_QUEUE: usize = 1;
const FUSE_INIT: u32 = 26;

#[derive(Arbitrary, Debug)]
struct Request {
    opcode: u8,
    nodeid: u8,
    uid: u32,
    gid: u32,
    body: Vec<u8>,
    /// Replaces the header's `len` (otherwise header + body).
    len: Option<u32>,
    /// Splits the request into two readable buffers at this byte.
    split: Option<u16>,
    reply_len: u16,
    hiprio: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    skip_init: bool,
    init_flags: u32,
    requests: Vec<Request>,
}

fn header(len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&uid.to_le_bytes());
    h.extend_from_slice(&gid.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // pid
    h.extend_from_slice(&0u32.to_le_bytes()); // total_extlen, padding
    h
}

fn send(
    d: &mut Driver,
    fs: &mut VirtioFs,
    queue: usize,
    req: &[u8],
    split: Option<u16>,
    reply_len: u32,
) {
    let req = &req[..req.len().min(0x1_8000)];
    d.write(REQ, req);
    let len = req.len() as u32;
    let mut bufs = Vec::new();
    match split.map(u32::from).filter(|&s| s > 0 && s < len) {
        Some(s) => {
            bufs.push((REQ, s, false));
            bufs.push((REQ + u64::from(s), len - s, false));
        }
        None => bufs.push((REQ, len, false)),
    }
    bufs.push((REPLY, reply_len, true));
    d.publish(queue, &bufs);
    kiln_fuzz::notify(fs, queue);
}

fuzz_target!(|input: Input| {
    let share = Share::new();
    let mut fs = VirtioFs::new("fuzz", &share.dir(), false).expect("virtio-fs device");
    let Some(mut d) = Driver::activate(&mut fs, 2) else {
        return;
    };
    if !input.skip_init {
        let mut init = Vec::new();
        init.extend_from_slice(&7u32.to_le_bytes());
        init.extend_from_slice(&31u32.to_le_bytes());
        init.extend_from_slice(&(128u32 << 10).to_le_bytes());
        init.extend_from_slice(&input.init_flags.to_le_bytes());
        init.extend_from_slice(&[0u8; 48]);
        let mut req = header(40 + init.len() as u32, FUSE_INIT, 1, 0, 0, 0);
        req.extend_from_slice(&init);
        send(&mut d, &mut fs, REQUEST_QUEUE, &req, None, 4096);
    }
    for (i, r) in input.requests.iter().take(64).enumerate() {
        let len = r.len.unwrap_or(40 + r.body.len() as u32);
        let mut req = header(
            len,
            u32::from(r.opcode),
            2 + i as u64,
            u64::from(r.nodeid),
            r.uid,
            r.gid,
        );
        req.extend_from_slice(&r.body);
        let queue = if r.hiprio { 0 } else { REQUEST_QUEUE };
        send(
            &mut d,
            &mut fs,
            queue,
            &req,
            r.split,
            u32::from(r.reply_len).max(16),
        );
    }
    fs.stop();
    drop(fs);
    share.check_confined();
});
