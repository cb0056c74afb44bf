//! virtio-vsock (virtio 1.2 §5.10): a userspace socket device with Firecracker's host protocol.
//!
//! The guest always has CID [`GUEST_CID`] (3); the host is [`HOST_CID`] (2). Host side:
//!
//! - a host process connects to the Unix socket at `uds_path` and writes `CONNECT <port>\n`; the
//!   device opens a stream to guest port `<port>` and, once the guest accepts, answers
//!   `OK <hostport>\n` (`hostport` is an ephemeral port kiln assigns, from [`EPHEMERAL_PORT_BASE`]);
//!   if the guest refuses, the host stream is closed;
//! - a guest connecting to host CID 2 port `P` reaches a listener at `<uds_path>_P`; if nobody
//!   listens there, the guest gets a reset.
//!
//! Stream sockets only, with the spec's credit-based flow control. Everything the guest puts on
//! the queues is untrusted: malformed packets are dropped or answered with a reset, never a panic
//! or an unbounded allocation.

mod connection;
mod device;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};

/// The guest's CID. Fixed: every kiln VM has exactly one vsock device.
pub const GUEST_CID: u64 = 3;
/// The host's CID (virtio 1.2 §5.10.4: "the host is always CID 2").
pub const HOST_CID: u64 = 2;
/// First host port kiln assigns to host-initiated connections (as Firecracker does).
pub const EPHEMERAL_PORT_BASE: u32 = 1 << 30;
/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;
/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Receive buffer each connection advertises to the guest (its `buf_alloc`): the most guest data
/// the device holds for a host socket that is not reading.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most open connections; further requests are reset.
pub const MAX_CONNECTIONS: usize = 1024;

/// Why the vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix socket path already exists.
    #[error("vsock socket {}: the path is in use (remove it or choose another path)", .0.display())]
    PathInUse(PathBuf),
    /// Binding the Unix socket failed for another reason.
    #[error("vsock socket {}: cannot listen on the Unix socket: {source}", path.display())]
    Listen {
        /// The Unix socket path.
        path: PathBuf,
        /// What bind(2) said.
        source: std::io::Error,
    },
    /// The guest CID is reserved.
    #[error("vsock guest CID {0} is reserved (must be 3..=4294967294)")]
    BadCid(u64),
}
