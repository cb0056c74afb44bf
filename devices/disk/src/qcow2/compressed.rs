//! Decompressing one qcow2 compressed cluster, zlib (raw deflate) or zstd, with QEMU's rules
//! (block/qcow2-threads.c): the output must be exactly one cluster, and the input may have
//! trailing bytes (its length is only known to the sector).
//!
//! The image is untrusted: output never grows past one cluster, and the zstd window the decoder
//! may allocate is capped at the largest qcow2 cluster (2 MiB), which is all a frame QEMU wrote
//! for one cluster ever needs.

use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use super::header::Compression;

/// log2 of the largest zstd window a compressed cluster may ask for (2 MiB, the largest cluster).
const ZSTD_WINDOW_LOG_MAX: u32 = 21;

/// Why a compressed cluster did not decompress to exactly one cluster.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// The codec refused the data.
    #[error("{codec}: {reason}")]
    Codec { codec: &'static str, reason: String },
    /// The data ended before a whole cluster came out.
    #[error("{codec}: data ends after {got} of {want} bytes")]
    Short {
        codec: &'static str,
        got: usize,
        want: usize,
    },
    /// More data follows a full cluster in the same zstd frame (a damaged or foreign frame).
    #[error("zstd: frame continues past the cluster size ({want} bytes)")]
    Overlong { want: usize },
}

/// Decompresses `input` (a compressed cluster as stored) into `out`, which must come out full.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    match kind {
        Compression::Zlib => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

/// QEMU's `qcow2_zlib_decompress`: raw deflate; a full output buffer is success even when the
/// stream's end was not reached (the input length is only known to the sector).
fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let mut z = flate2::Decompress::new(false);
    let status = z
        .decompress(input, out, flate2::FlushDecompress::Finish)
        .map_err(|e| DecompressError::Codec {
            codec: "zlib",
            reason: e.to_string(),
        })?;
    let got = usize::try_from(z.total_out()).unwrap_or(usize::MAX);
    match status {
        _ if got == out.len() => Ok(()),
        _ => Err(DecompressError::Short {
            codec: "zlib",
            got,
            want: out.len(),
        }),
    }
}

/// QEMU's `qcow2_zstd_decompress`: decode frames until the output is full; every step must make
/// progress, and the last frame must end exactly at the cluster's end.
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let codec = |e: std::io::Error| DecompressError::Codec {
        codec: "zstd",
        reason: e.to_string(),
    };
    let want = out.len();
    let mut decoder = Decoder::new().map_err(codec)?;
    decoder
        .set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(codec)?;
    let mut input = InBuffer::around(input);
    let mut output = OutBuffer::around(out);
    let mut remaining = 0;
    while output.pos() < want {
        let (in_before, out_before) = (input.pos(), output.pos());
        remaining = decoder.run(&mut input, &mut output).map_err(codec)?;
        if input.pos() <= in_before && output.pos() <= out_before {
            return Err(DecompressError::Short {
                codec: "zstd",
                got: output.pos(),
                want,
            });
        }
    }
    if remaining > 0 {
        return Err(DecompressError::Overlong { want });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    fn zstd_frame(data: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(data, 3).expect("compress")
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("deflate");
        e.finish().expect("deflate")
    }

    #[test]
    fn zstd_cluster_with_trailing_bytes_decodes() {
        let data = pattern(65536);
        let mut input = zstd_frame(&data);
        input.extend_from_slice(&[0xa5; 300]);
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zstd, &input, &mut out).expect("decompress");
        assert!(out == data);
    }

    #[test]
    fn zstd_cluster_of_two_frames_decodes() {
        let data = pattern(32768);
        let mut input = zstd_frame(&data[..10000]);
        input.extend(zstd_frame(&data[10000..]));
        let mut out = vec![0u8; 32768];
        decompress(Compression::Zstd, &input, &mut out).expect("decompress");
        assert!(out == data);
    }

    #[test]
    fn zlib_cluster_decodes() {
        let data = pattern(4096);
        let mut input = deflate(&data);
        input.extend_from_slice(&[0; 100]);
        let mut out = vec![0u8; 4096];
        decompress(Compression::Zlib, &input, &mut out).expect("decompress");
        assert!(out == data);
    }

    #[test]
    fn truncated_zstd_is_an_error() {
        let data = pattern(65536);
        let input = zstd_frame(&data);
        let mut out = vec![0u8; 65536];
        let e = decompress(Compression::Zstd, &input[..input.len() / 2], &mut out).unwrap_err();
        assert!(matches!(e, DecompressError::Short { .. }), "{e}");
        assert!(decompress(Compression::Zstd, &[], &mut out).is_err());
    }

    #[test]
    fn zstd_larger_than_a_cluster_is_an_error_not_an_overflow() {
        let data = pattern(65536);
        let input = zstd_frame(&data);
        let mut out = vec![0u8; 4096];
        let e = decompress(Compression::Zstd, &input, &mut out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "zstd: frame continues past the cluster size (4096 bytes)"
        );
    }

    #[test]
    fn zstd_shorter_than_a_cluster_is_an_error() {
        let input = zstd_frame(&pattern(1000));
        let mut out = vec![0u8; 4096];
        let e = decompress(Compression::Zstd, &input, &mut out).unwrap_err();
        assert!(matches!(e, DecompressError::Short { got: 1000, .. }), "{e}");
    }

    #[test]
    fn zstd_window_larger_than_2_mib_is_refused() {
        // A frame that declares an 8 MiB window (no content size, so the window is what a
        // decoder would allocate); the decoder must refuse it, not allocate.
        let mut enc = zstd::stream::raw::Encoder::new(1).expect("encoder");
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(23))
            .expect("window");
        let mut w = zstd::stream::write::Encoder::with_encoder(Vec::new(), enc);
        w.write_all(&pattern(4 << 20)).expect("write");
        let input = w.finish().expect("finish");
        let mut out = vec![0u8; 2 << 20];
        let e = decompress(Compression::Zstd, &input, &mut out).unwrap_err();
        assert!(e.to_string().starts_with("zstd: "), "{e}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut out = vec![0u8; 65536];
        for round in 0..500 {
            let len = round % 700;
            let mut input: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            if round % 2 == 0 && len >= 4 {
                input[..4].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]); // zstd magic
            }
            assert!(decompress(Compression::Zstd, &input, &mut out).is_err());
            let _ = decompress(Compression::Zlib, &input, &mut out);
        }
    }
}
