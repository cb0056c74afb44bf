//! Framing: a 4-byte big-endian payload length, then that many bytes of JSON encoding one
//! [`Message`]. Readers refuse lengths over [`MAX_FRAME_LEN`] before allocating anything.

use std::io::{self, Read, Write};

use crate::message::Message;

/// The largest payload a frame may carry (16 MiB).
pub const MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream at a frame boundary.
    #[error("connection closed by the peer")]
    Closed,
    /// The peer closed the stream in the middle of a frame.
    #[error("connection closed mid-frame after {got} of {expected} bytes")]
    Truncated {
        /// Bytes the frame should have had (header or payload).
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// The length prefix is over the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The announced payload length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Decode(#[source] serde_json::Error),
    /// The message could not be encoded (or would exceed the limit).
    #[error("cannot encode {kind} message: {reason}")]
    Encode {
        /// The message type.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// A read or write timeout set on the stream passed.
    #[error("timed out waiting for the peer")]
    Timeout,
    /// Any other I/O failure.
    #[error("stream I/O failed: {0}")]
    Io(#[source] io::Error),
}

impl FrameError {
    /// Whether the stream is still at a frame boundary after this error (so a session on a
    /// shared stream may continue): true only for payloads that were read whole but did not parse.
    pub fn stream_in_sync(&self) -> bool {
        matches!(self, FrameError::Decode(_))
    }
}

fn io_error(e: io::Error) -> FrameError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FrameError::Timeout,
        _ => FrameError::Io(e),
    }
}

/// Encode `message` as a complete frame (length prefix included).
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, FrameError> {
    let encode_error = |reason: String| FrameError::Encode {
        kind: message.kind(),
        reason,
    };
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, message).map_err(|e| encode_error(e.to_string()))?;
    let len = buf.len() - 4;
    let len32 = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_LEN)
        .ok_or_else(|| {
            encode_error(format!(
                "{len} bytes exceed the {MAX_FRAME_LEN}-byte frame limit"
            ))
        })?;
    buf[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(buf)
}

/// Write `message` as one frame and flush.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, message: &Message) -> Result<(), FrameError> {
    let buf = encode_frame(message)?;
    w.write_all(&buf).map_err(io_error)?;
    w.flush().map_err(io_error)
}

/// Read exactly `buf.len()` bytes; `Ok(false)` when the stream ends before the first byte.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<bool, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    expected: buf.len(),
                    got,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    Ok(true)
}

/// Read one frame's payload, refusing lengths over `max`.
pub fn read_frame_payload<R: Read + ?Sized>(r: &mut R, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    if !read_full(r, &mut header)? {
        return Err(FrameError::Closed);
    }
    let len = u32::from_be_bytes(header);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // `len <= max <= u32::MAX` fits in usize on every target this crate builds for.
    let mut payload = vec![0u8; len as usize];
    if !read_full(r, &mut payload)? && len > 0 {
        return Err(FrameError::Truncated {
            expected: payload.len(),
            got: 0,
        });
    }
    Ok(payload)
}

/// Read and decode one frame of at most [`MAX_FRAME_LEN`] bytes.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Message, FrameError> {
    let payload = read_frame_payload(r, MAX_FRAME_LEN)?;
    serde_json::from_slice(&payload).map_err(FrameError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn frame_is_big_endian_length_then_json() {
        let bytes = encode_frame(&Message::Ok).expect("encodes");
        assert_eq!(&bytes[..4], &[0, 0, 0, 13]);
        assert_eq!(&bytes[4..], br#"{"type":"ok"}"#);
        let back = read_frame(&mut Cursor::new(bytes)).expect("decodes");
        assert_eq!(back, Message::Ok);
    }

    #[test]
    fn several_frames_in_one_stream() {
        let mut stream = Vec::new();
        write_frame(&mut stream, &Message::Ok).expect("writes");
        write_frame(&mut stream, &Message::Shutdown { reboot: true }).expect("writes");
        let mut r = Cursor::new(stream);
        assert_eq!(read_frame(&mut r).expect("first"), Message::Ok);
        assert_eq!(
            read_frame(&mut r).expect("second"),
            Message::Shutdown { reboot: true }
        );
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn oversize_length_is_refused_before_reading_the_payload() {
        let mut bytes = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let err = read_frame(&mut Cursor::new(bytes)).expect_err("refused");
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == MAX_FRAME_LEN + 1));
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[test]
    fn truncated_header_and_payload_are_reported() {
        let err = read_frame(&mut Cursor::new(vec![0, 0])).expect_err("short header");
        assert!(matches!(
            err,
            FrameError::Truncated {
                expected: 4,
                got: 2
            }
        ));
        let err = read_frame(&mut Cursor::new(vec![0, 0, 0, 10, b'{'])).expect_err("short");
        assert!(matches!(
            err,
            FrameError::Truncated {
                expected: 10,
                got: 1
            }
        ));
    }

    #[test]
    fn garbage_payload_is_a_decode_error_in_sync() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"\xff\xfe!");
        let err = read_frame(&mut Cursor::new(bytes)).expect_err("garbage");
        assert!(matches!(err, FrameError::Decode(_)));
        assert!(err.stream_in_sync());
    }

    #[test]
    fn oversize_message_is_refused_on_encode() {
        let message = Message::Stdout {
            data: vec![0; MAX_FRAME_LEN as usize],
        };
        assert!(matches!(
            encode_frame(&message),
            Err(FrameError::Encode { .. })
        ));
    }
}
