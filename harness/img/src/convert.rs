//! `kiln img convert`: reads the source's whole backing chain through kiln's disk layer and
//! writes a flat raw or qcow2 image, skipping what reads as zeroes (holes in raw, unallocated
//! clusters in qcow2) as `qemu-img convert` does on a fresh target. The target appears only
//! complete (temporary file + rename).

use std::fs;
use std::os::unix::fs::FileExt;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, StorageOpenOptions};

use super::chain::{self, Layer};
use super::create::{allocate_first_block, os_msg, NewFile, NewFileError};
use super::disk::Disk;
use super::error::ImgError;
use super::opts::ImgFormat;
use super::{status, Output};

/// Bytes read from the source per step.
const CHUNK: u64 = 1 << 20;
/// Zero detection granularity for raw targets (qemu-img's default `-S 4k`).
const RAW_GRANULE: u64 = 4096;
/// Cluster size of qcow2 targets (qemu-img's default).
const QCOW2_CLUSTER: u64 = 65536;

/// What `kiln img convert` was asked for.
#[derive(Debug, Clone, Default)]
pub struct ConvertArgs {
    pub src_fmt: Option<String>,
    pub out_fmt: String,
    pub src: String,
    pub dst: String,
}

/// Why the target could not be written (qemu-img's words, without the target's name).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The target file could not be created or put in place.
    #[error(transparent)]
    File(#[from] NewFileError),
    /// Setting up or flushing the target failed.
    #[error("{}", os_msg(.0))]
    Io(#[from] std::io::Error),
    /// The source could not be read.
    #[error(transparent)]
    Read(#[from] ImgError),
    /// A write to the target failed.
    #[error("error while writing at byte {offset}: {}", os_msg(source))]
    Write {
        /// Where in the image.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where bytes go: a raw file or an imago qcow2 image.
enum Target {
    Raw(fs::File),
    Qcow2(FormatAccess<ImagoFile>),
}

impl Target {
    fn write(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        match self {
            Target::Raw(f) => f.write_all_at(buf, offset),
            Target::Qcow2(q) => q.write(buf, offset),
        }
    }
}

/// `kiln img convert`: exit 0 on success, 1 on any error (qemu-img's codes).
pub fn convert(a: &ConvertArgs) -> Output {
    let usage = |msg: String| Output::err(&ImgError::Usage(msg), status::FAILED);
    let Some(out_fmt) = ImgFormat::parse(&a.out_fmt) else {
        return usage(format!("Unknown file format '{}'", a.out_fmt));
    };
    if let Some(f) = a
        .src_fmt
        .as_deref()
        .filter(|f| ImgFormat::parse(f).is_none())
    {
        return usage(format!(
            "{}: -f {f}: unsupported (kiln reads raw and qcow2)",
            a.src
        ));
    }
    let layers = match chain::resolve_chain_as(&a.src, a.src_fmt.as_deref()) {
        Ok(l) => l,
        Err(e) => return Output::err(&e, status::FAILED),
    };
    if let Some(layer) = in_chain(&a.dst, &layers) {
        return usage(format!(
            "{}: error while converting {}: it is {} of the source chain; refusing to \
             overwrite it",
            a.dst,
            out_fmt.name(),
            layer.name
        ));
    }
    let disk = match Disk::open(layers) {
        Ok(d) => d,
        Err(e) => return Output::err(&e, status::FAILED),
    };
    match write_target(&disk, &a.dst, out_fmt) {
        Ok(()) => Output::ok(String::new()),
        Err(source) => Output::err(
            &ImgError::Convert {
                dst: a.dst.clone(),
                fmt: out_fmt,
                source: Box::new(source),
            },
            status::FAILED,
        ),
    }
}

/// The layer of `layers` that `dst` names, if any (the same file, by canonical path).
fn in_chain<'a>(dst: &str, layers: &'a [Layer]) -> Option<&'a Layer> {
    let d = fs::canonicalize(dst).ok()?;
    layers
        .iter()
        .find(|l| fs::canonicalize(l.path()).is_ok_and(|p| p == d))
}

fn write_target(disk: &Disk, dst: &str, fmt: ImgFormat) -> Result<(), ConvertError> {
    let size = disk.size();
    let new = NewFile::create(dst)?;
    let (target, granule) = match fmt {
        ImgFormat::Raw => {
            let f = new.handle()?;
            f.set_len(size)?;
            allocate_first_block(&f, size)?;
            (Target::Raw(f), RAW_GRANULE)
        }
        ImgFormat::Qcow2 => {
            let storage = ImagoFile::from_open_file(
                new.handle()?,
                StorageOpenOptions::new().filename(dst).write(true),
            )?;
            let q = Qcow2::<ImagoFile>::create_builder(storage)
                .cluster_size(QCOW2_CLUSTER as usize)
                .size(size)
                .create_open(DenyImplicitOpenGate::default(), |image| {
                    Ok(Qcow2::<ImagoFile>::builder(image))
                })?;
            (Target::Qcow2(FormatAccess::new(q)), QCOW2_CLUSTER)
        }
    };
    copy_data(disk, &target, size, granule)?;
    if let Target::Qcow2(q) = &target {
        q.flush()?;
    }
    drop(target);
    Ok(new.commit()?)
}

/// Copies the image in aligned chunks: a chunk with no data at all (per block status) is
/// skipped, any other is read whole and its non-zero granules written, so a target cluster is
/// written completely (zeroes included) as qemu-img writes it.
fn copy_data(disk: &Disk, target: &Target, size: u64, granule: u64) -> Result<(), ConvertError> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < size {
        let end = size.min((off / CHUNK + 1) * CHUNK);
        let mut next = end;
        let mut p = off;
        let mut has_data = false;
        while p < end {
            let ext = disk.status_at(p, size - p)?;
            let len = ext.length.clamp(1, size - p);
            if ext.data || !ext.zero {
                has_data = true;
                break;
            }
            // A hole past this chunk lets whole chunks be skipped.
            next = next.max((p + len) / CHUNK * CHUNK);
            p += len;
        }
        if has_data {
            next = end;
            let chunk = &mut buf[..(end - off) as usize];
            disk.read(chunk, off)?;
            write_nonzero(target, chunk, off, granule).map_err(|source| ConvertError::Write {
                offset: off,
                source,
            })?;
        }
        off = next;
    }
    Ok(())
}

/// Writes the runs of `chunk` (at guest offset `at`) whose granules are not all zeroes.
fn write_nonzero(target: &Target, chunk: &[u8], at: u64, granule: u64) -> std::io::Result<()> {
    let end = at + chunk.len() as u64;
    let mut run: Option<u64> = None;
    let mut w = at / granule * granule;
    while w < end {
        let (s, e) = (w.max(at), (w + granule).min(end));
        let slice = &chunk[(s - at) as usize..(e - at) as usize];
        let zero = slice.iter().all(|&b| b == 0);
        match (zero, run) {
            (false, None) => run = Some(s),
            (true, Some(r)) => {
                target.write(&chunk[(r - at) as usize..(s - at) as usize], r)?;
                run = None;
            }
            _ => {}
        }
        w += granule;
    }
    if let Some(r) = run {
        target.write(&chunk[(r - at) as usize..], r)?;
    }
    Ok(())
}
