//! The kiln guest agent: PID 1 of kiln's initramfs (or a systemd service) that serves the
//! protocol of `kiln-agent-proto` over vsock and/or a virtio-serial port.
//!
//! Request handling ([`session`]) works over any byte stream, so it is tested on socket pairs
//! without a VM; [`init`] and [`transport`] hold the parts that need a guest kernel.

pub mod children;
pub mod cmdline;
pub mod exec;
pub mod files;
pub mod pty;
pub mod resume;
pub mod session;

pub use files::FilePolicy;
pub use session::{serve_session, serve_stream, Agent, Outcome, SessionError};
pub mod init;
pub mod transport;
