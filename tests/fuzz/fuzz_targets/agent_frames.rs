//! The agent protocol, both directions: frames as either side decodes them (what a hostile host
//! sends the agent, what a hostile guest sends the harness), and the host client's state machine
//! reading a hostile agent's replies to `exec` and `get`.
#![no_main]

use std::io::{self, Cursor, Read, Write};

use kiln_agent_proto::client::{Client, StreamTimeouts};
use kiln_agent_proto::frame::encode_frame;
use kiln_agent_proto::{read_frame, ExecRequest};
use libfuzzer_sys::fuzz_target;

/// A stream whose reads return the fuzzed bytes and whose writes go nowhere.
struct Hostile(Cursor<Vec<u8>>);

impl Read for Hostile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Hostile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl StreamTimeouts for Hostile {}

fuzz_target!(|data: &[u8]| {
    // Decoding: every message that decodes encodes again and decodes to the same message.
    let mut r = Cursor::new(data);
    for _ in 0..64 {
        let Ok(message) = read_frame(&mut r) else {
            break;
        };
        let frame = encode_frame(&message).expect("a decoded message encodes");
        let again = read_frame(&mut Cursor::new(frame)).expect("an encoded message decodes");
        assert_eq!(again, message);
    }
    // The host client against a hostile agent.
    let mut client = Client::new(Hostile(Cursor::new(data.to_vec()))).max_output(1 << 20);
    let _ = client.exec(&ExecRequest::new(["true"]));
    let mut client = Client::new(Hostile(Cursor::new(data.to_vec())));
    let _ = client.get("/fixture", 1 << 20);
});
