//! `kiln img create`: raw and qcow2 images made by imago (kiln's disk layer), announced and
//! refused the way `qemu-img create` does. Files appear only complete: written to a temporary
//! file beside the target and renamed over it.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatCreateBuilder, StorageOpenOptions};
use kiln_disk::qcow2::{COMPAT_FEATURES_OFFSET, COMPAT_LAZY_REFCOUNTS};

use super::chain::{self, path_combine};
use super::error::ImgError;
use super::opts::{parse_size_in, CreateOpts, ImgFormat, OptError};
use super::Profile;
use super::{status, Output};

/// qcow2's largest L1 table (QEMU's `QCOW_MAX_L1_SIZE`, 32 MiB of 8-byte entries).
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// What `kiln img create` was asked for (the command line, unparsed values included).
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    pub fmt: String,
    pub file: String,
    pub size: Option<String>,
    pub backing: Option<String>,
    pub backing_fmt: Option<String>,
    pub options: Vec<String>,
    pub quiet: bool,
    /// Whose messages to answer with where qemu-img versions differ (size errors).
    pub profile: Profile,
}

/// The OS error text without Rust's " (os error N)" suffix, as QEMU prints `strerror`.
pub(super) fn os_msg(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Why a new image file could not be put in place, in qemu-img's words.
#[derive(Debug, thiserror::Error)]
pub enum NewFileError {
    /// The file could not be created (or renamed into place).
    #[error("Could not create '{dest}': {}", os_msg(source))]
    Create {
        /// The target as given.
        dest: String,
        /// The OS error.
        source: io::Error,
    },
    /// The file could not be synced.
    #[error("Could not write '{dest}': {}", os_msg(source))]
    Write {
        /// The target as given.
        dest: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Why `kiln img create` refuses or fails, in qemu-img's words (without the file name).
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A `-o` option qemu-img would refuse.
    #[error(transparent)]
    Option(#[from] OptError),
    /// No size and no backing file to take it from.
    #[error("Image creation needs a size parameter")]
    NeedsSize,
    /// `-b` with `-f raw`.
    #[error("Backing file not supported for file format 'raw'")]
    RawBacking,
    /// The backing file cannot be opened.
    #[error(
        "Could not open '{path}': {} (could not open backing image)",
        os_msg(source)
    )]
    BackingOpen {
        /// The backing file, as combined with the image's directory.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The backing file opens but is not a usable image.
    #[error("could not open backing image: {0}")]
    BackingImage(#[source] Box<ImgError>),
    /// `-b` without `-F` (required since qemu-img 7.2).
    #[error("Backing file specified without backing format (detected format of {0}; pass -F {0})")]
    BackingFormatMissing(&'static str),
    /// A backing format kiln cannot read.
    #[error("backing_fmt={0}: unsupported (kiln reads raw and qcow2 backing files)")]
    BackingFormatUnsupported(String),
    /// Preallocation other than `off`.
    #[error("preallocation={0}: unsupported (kiln creates sparse images only)")]
    Preallocation(String),
    /// An unknown `compat`.
    #[error("Parameter 'version' does not accept value '{0}'")]
    Version(String),
    /// A cluster size qcow2 does not allow.
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    ClusterSize,
    /// A refcount width qcow2 does not allow.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountWidth,
    /// A refcount width other than 16 in a version 2 image.
    #[error(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above (use \
         version=v3 or greater)"
    )]
    V2RefcountWidth,
    /// Lazy refcounts in a version 2 image.
    #[error(
        "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 \
         or greater)"
    )]
    V2LazyRefcounts,
    /// A version 2 image, which imago cannot create.
    #[error("compat={0}: unsupported (imago creates qcow2 version 3 images only; use compat=1.1)")]
    V2(String),
    /// Subclusters, which imago cannot create.
    #[error("extended_l2=on: unsupported (imago cannot create subclusters)")]
    ExtendedL2,
    /// zstd compression, which imago cannot write.
    #[error("compression_type=zstd: unsupported (imago writes zlib only)")]
    Zstd,
    /// An unknown compression type.
    #[error("Parameter 'compression-type' does not accept value '{0}'")]
    CompressionType(String),
    /// More L1 entries than qcow2 allows.
    #[error(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    )]
    L1TooLarge,
    /// The file system refused the size.
    #[error("The image size is too large for file format '{}'", .0.name())]
    TooLarge(ImgFormat),
    /// The file could not be resized.
    #[error("Could not resize file: {}", os_msg(.0))]
    Resize(#[source] io::Error),
    /// Formatting failed otherwise.
    #[error("could not format {} image: {}", fmt.name(), os_msg(source))]
    Format {
        /// The format being written.
        fmt: ImgFormat,
        /// The OS error.
        source: io::Error,
    },
    /// The new file could not be created or put in place.
    #[error(transparent)]
    File(#[from] NewFileError),
}

/// A file being written under a temporary name in the target's directory; [`NewFile::commit`]
/// renames it over the target, dropping it uncommitted removes it.
pub(super) struct NewFile {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl NewFile {
    /// Creates the temporary file; the error is qemu-img's "Could not create 'DEST': …".
    pub(super) fn create(dest: &str) -> Result<Self, NewFileError> {
        let path = Path::new(dest);
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .map_or_else(|| "image".to_string(), |n| n.to_string_lossy().into_owned());
        let could_not = |source| NewFileError::Create {
            dest: dest.to_string(),
            source,
        };
        if path.is_dir() {
            return Err(could_not(io::Error::from_raw_os_error(libc::EISDIR)));
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.kiln-"))
            .tempfile_in(dir)
            .map_err(could_not)?;
        // qemu-img creates with mode 0644, or keeps the mode of the file it overwrites.
        let mode = fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777);
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode)).map_err(could_not)?;
        Ok(NewFile {
            tmp,
            dest: path.to_path_buf(),
        })
    }

    pub(super) fn file(&self) -> &File {
        self.tmp.as_file()
    }

    /// A second handle on the temporary file (imago takes ownership of one).
    pub(super) fn handle(&self) -> io::Result<File> {
        self.tmp.as_file().try_clone()
    }

    /// Syncs and renames the file into place.
    pub(super) fn commit(self) -> Result<(), NewFileError> {
        let dest = self.dest.display().to_string();
        if let Err(source) = self.tmp.as_file().sync_all() {
            return Err(NewFileError::Write { dest, source });
        }
        self.tmp
            .persist(&self.dest)
            .map(|_| ())
            .map_err(|e| NewFileError::Create {
                dest,
                source: e.error,
            })
    }
}

/// A validated create request.
struct Plan {
    fmt: ImgFormat,
    size: u64,
    cluster_size: u64,
    refcount_bits: u64,
    lazy_refcounts: bool,
    backing: Option<(String, String)>,
}

/// `kiln img create`: exit 0 on success, 1 on any error (qemu-img's codes).
pub fn create(a: &CreateArgs) -> Output {
    let file = a.file.as_str();
    let fail = |stdout: String, e: ImgError| Output {
        stdout,
        ..Output::err(&e, status::FAILED)
    };
    let Some(fmt) = ImgFormat::parse(&a.fmt) else {
        let msg = match a.fmt.as_str() {
            "vmdk" | "vdi" | "vhdx" | "vpc" | "qed" | "qcow" | "luks" | "parallels" | "dmg"
            | "cloop" | "bochs" => format!("{file}: unsupported (image format '{}')", a.fmt),
            other => format!("{file}: Unknown file format '{other}'"),
        };
        return fail(String::new(), ImgError::Usage(msg));
    };
    let size_arg = match a.size.as_deref().map(|s| parse_size_in(s, a.profile)) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return fail(String::new(), ImgError::Usage(e.message(a.profile))),
    };
    let failed = |source: CreateError| ImgError::Create {
        file: file.to_string(),
        source,
    };
    let mut o = CreateOpts::default();
    for arg in &a.options {
        if let Err(e) = o.add(fmt, arg) {
            return fail(String::new(), failed(e.into()));
        }
    }
    // -b/-F and the size argument take precedence over -o, as in qemu-img.
    if a.backing.is_some() {
        o.backing_file.clone_from(&a.backing);
    }
    if a.backing_fmt.is_some() {
        o.backing_fmt.clone_from(&a.backing_fmt);
    }
    if size_arg.is_some() {
        o.size = size_arg;
    }
    let size = match backing_and_size(file, fmt, &o) {
        Ok(s) => s,
        Err(e) => return fail(String::new(), failed(e)),
    };
    let line = if a.quiet {
        String::new()
    } else {
        format!("{}\n", o.formatting_line(file, fmt, size))
    };
    let plan = match validate(fmt, size, &o) {
        Ok(p) => p,
        Err(e) => return fail(line, failed(e)),
    };
    match write_image(file, &plan) {
        Ok(()) => Output::ok(line),
        Err(e) => fail(line, failed(e)),
    }
}

/// Checks the backing file (it must open in the named format) and settles the size: the
/// argument's, else the backing image's virtual size.
fn backing_and_size(file: &str, fmt: ImgFormat, o: &CreateOpts) -> Result<u64, CreateError> {
    let Some(backing) = o.backing_file.as_deref() else {
        return o.size.ok_or(CreateError::NeedsSize);
    };
    if fmt == ImgFormat::Raw {
        return Err(CreateError::RawBacking);
    }
    let combined = path_combine(file, backing);
    let open_err = |e: ImgError| match e {
        ImgError::Io { source, .. } => CreateError::BackingOpen {
            path: combined.clone(),
            source,
        },
        other => CreateError::BackingImage(Box::new(other)),
    };
    let Some(bfmt) = o.backing_fmt.as_deref() else {
        let probed = chain::open_layer(&combined, None).map_err(open_err)?;
        return Err(CreateError::BackingFormatMissing(probed.format.name()));
    };
    if ImgFormat::parse(bfmt).is_none() {
        return Err(CreateError::BackingFormatUnsupported(bfmt.into()));
    }
    let layer = chain::open_layer(&combined, Some(bfmt)).map_err(open_err)?;
    Ok(o.size.unwrap_or_else(|| layer.virtual_size()))
}

/// The checks qemu-img's qcow2 driver makes after printing the "Formatting" line, with its
/// messages, and the options imago cannot create (refused, saying so).
fn validate(fmt: ImgFormat, size: u64, o: &CreateOpts) -> Result<Plan, CreateError> {
    // Raw and qcow2 sizes are whole sectors (QEMU rounds up to 512 bytes).
    let size = size.div_ceil(512) * 512;
    if let Some(p) = o.preallocation.as_deref().filter(|p| *p != "off") {
        return Err(CreateError::Preallocation(p.into()));
    }
    let backing = o.backing_file.clone().zip(o.backing_fmt.clone());
    if fmt == ImgFormat::Raw {
        return Ok(Plan {
            fmt,
            size,
            cluster_size: 0,
            refcount_bits: 0,
            lazy_refcounts: false,
            backing,
        });
    }
    let v2 = match o.compat.as_deref() {
        None | Some("1.1") | Some("v3") => false,
        Some("0.10") | Some("v2") => true,
        Some(other) => return Err(CreateError::Version(other.into())),
    };
    let cluster_size = o.cluster_size.unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(CreateError::ClusterSize);
    }
    let refcount_bits = o.refcount_bits.unwrap_or(16);
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(CreateError::RefcountWidth);
    }
    let lazy_refcounts = o.lazy_refcounts.as_ref().is_some_and(|(_, on)| *on);
    if v2 && refcount_bits != 16 {
        return Err(CreateError::V2RefcountWidth);
    }
    if v2 && lazy_refcounts {
        return Err(CreateError::V2LazyRefcounts);
    }
    if v2 {
        let compat = o.compat.as_deref().unwrap_or("0.10");
        return Err(CreateError::V2(compat.into()));
    }
    if o.extended_l2.as_ref().is_some_and(|(_, on)| *on) {
        return Err(CreateError::ExtendedL2);
    }
    match o.compression_type.as_deref() {
        None | Some("zlib") => {}
        Some("zstd") => return Err(CreateError::Zstd),
        Some(other) => return Err(CreateError::CompressionType(other.into())),
    }
    let per_l1 = cluster_size * (cluster_size / 8);
    if size.div_ceil(per_l1) > MAX_L1_ENTRIES {
        return Err(CreateError::L1TooLarge);
    }
    Ok(Plan {
        fmt,
        size,
        cluster_size,
        refcount_bits,
        lazy_refcounts,
        backing,
    })
}

/// Maps an I/O error from formatting to qemu-img's wording.
fn format_err(fmt: ImgFormat) -> impl Fn(io::Error) -> CreateError {
    move |source| match source.raw_os_error() {
        Some(libc::EFBIG) => CreateError::TooLarge(fmt),
        Some(libc::EINVAL) => CreateError::Resize(source),
        _ => CreateError::Format { fmt, source },
    }
}

fn imago_storage(new: &NewFile, path: &str) -> io::Result<ImagoFile> {
    ImagoFile::from_open_file(
        new.handle()?,
        StorageOpenOptions::new().filename(path).write(true),
    )
}

fn write_image(file: &str, p: &Plan) -> Result<(), CreateError> {
    let new = NewFile::create(file)?;
    let storage = imago_storage(&new, file).map_err(format_err(p.fmt))?;
    match p.fmt {
        ImgFormat::Raw => {
            Raw::create_builder(storage)
                .size(p.size)
                .create()
                .map_err(format_err(p.fmt))?;
            allocate_first_block(new.file(), p.size).map_err(format_err(p.fmt))?;
        }
        ImgFormat::Qcow2 => {
            let mut b = Qcow2::<ImagoFile>::create_builder(storage)
                .cluster_size(p.cluster_size as usize)
                .refcount_width(p.refcount_bits as usize)
                .size(p.size);
            if let Some((name, fmt)) = &p.backing {
                b = b.backing(name.clone(), fmt.clone());
            }
            b.create().map_err(format_err(p.fmt))?;
            if p.lazy_refcounts {
                set_lazy_refcounts(new.file()).map_err(format_err(p.fmt))?;
            }
        }
    }
    Ok(new.commit()?)
}

/// Allocates the first block of a new raw image as QEMU's file driver does (so both report the
/// same disk size): 4 KiB, or one sector when the image is smaller than 4 KiB.
pub(super) fn allocate_first_block(f: &File, size: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if size == 0 {
        return Ok(());
    }
    let len: u64 = if size < 4096 { 512 } else { 4096 };
    // SAFETY: fallocate reads only its integer arguments; `f` keeps the fd open for the call.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    f.write_all_at(&vec![0u8; len as usize], 0)
}

/// Sets the lazy-refcounts compatible feature bit in a freshly created (clean) v3 header;
/// imago's builder has no switch for it, and a clean image needs nothing else.
fn set_lazy_refcounts(f: &File) -> io::Result<()> {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, COMPAT_FEATURES_OFFSET)?;
    let bits = u64::from_be_bytes(b) | COMPAT_LAZY_REFCOUNTS;
    f.write_all_at(&bits.to_be_bytes(), COMPAT_FEATURES_OFFSET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(fmt: &str, file: &Path, size: Option<&str>) -> CreateArgs {
        CreateArgs {
            fmt: fmt.into(),
            file: file.display().to_string(),
            size: size.map(Into::into),
            ..CreateArgs::default()
        }
    }

    #[test]
    fn raw_is_sparse_and_sector_rounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("r.raw");
        let out = create(&args("raw", &f, Some("1000")));
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(
            out.stdout,
            format!("Formatting '{}', fmt=raw size=1000\n", f.display())
        );
        assert_eq!(fs::metadata(&f).expect("created").len(), 1024);
        // Nothing but the image is left in the directory.
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 1);
    }

    #[test]
    fn errors_are_one_line_and_exit_1() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("x.qcow2");
        let name = f.display().to_string();
        let cases: Vec<(CreateArgs, &str, bool)> = vec![
            (
                args("qcow2", &f, None),
                "Image creation needs a size parameter",
                false,
            ),
            (
                args("qcow2", &f, Some("12Q")),
                "Invalid image size specified: '12Q'.",
                false,
            ),
            (
                args("vmdkx", &f, Some("1M")),
                "Unknown file format 'vmdkx'",
                false,
            ),
            (
                CreateArgs {
                    options: vec!["cluster_size=3000".into()],
                    ..args("qcow2", &f, Some("1M"))
                },
                "Cluster size must be a power of two between 512 and 2048k",
                true,
            ),
            (
                CreateArgs {
                    options: vec!["compat=0.10".into()],
                    ..args("qcow2", &f, Some("1M"))
                },
                "compat=0.10: unsupported (imago creates qcow2 version 3 images only",
                true,
            ),
            (
                CreateArgs {
                    options: vec!["compat=0.10,refcount_bits=8".into()],
                    ..args("qcow2", &f, Some("1M"))
                },
                "Different refcount widths than 16 bits require compatibility level 1.1",
                true,
            ),
            (
                CreateArgs {
                    options: vec!["extended_l2=on".into()],
                    ..args("qcow2", &f, Some("1M"))
                },
                "extended_l2=on: unsupported",
                true,
            ),
            (
                args("qcow2", &f, Some("2251799813685249")),
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
                true,
            ),
            (
                CreateArgs {
                    backing: Some("gone.qcow2".into()),
                    backing_fmt: Some("qcow2".into()),
                    ..args("qcow2", &f, Some("1M"))
                },
                "gone.qcow2': No such file or directory (could not open backing image)",
                false,
            ),
            (
                CreateArgs {
                    backing: Some("x".into()),
                    ..args("raw", &f, Some("1M"))
                },
                "Backing file not supported for file format 'raw'",
                false,
            ),
            (
                args("qcow2", &dir.path().join("no/dir.qcow2"), Some("1M")),
                "no/dir.qcow2': No such file or directory",
                true,
            ),
        ];
        for (a, want, formatted) in cases {
            let out = create(&a);
            assert_eq!(out.code, 1, "{a:?}: {out:?}");
            assert!(out.stderr.contains(want), "{a:?}: {}", out.stderr);
            assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
            assert_eq!(out.stdout.starts_with("Formatting '"), formatted, "{out:?}");
        }
        assert!(!f.exists(), "{name} left behind");
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn overwrites_an_existing_file_keeping_its_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a.img");
        fs::write(&f, vec![7u8; 4096]).expect("write");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).expect("chmod");
        let out = create(&CreateArgs {
            quiet: true,
            ..args("qcow2", &f, Some("1M"))
        });
        assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{out:?}");
        let m = fs::metadata(&f).expect("exists");
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let layer = chain::open_layer(&f.display().to_string(), None).expect("qcow2");
        assert_eq!(layer.virtual_size(), 1 << 20);
    }

    #[test]
    fn size_comes_from_the_backing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        fs::write(&base, vec![1u8; 3 * 512]).expect("write");
        let top = dir.path().join("top.qcow2");
        let out = create(&CreateArgs {
            backing: Some("base.raw".into()),
            backing_fmt: Some("raw".into()),
            options: vec!["lazy_refcounts=on".into()],
            ..args("qcow2", &top, None)
        });
        assert_eq!(out.code, 0, "{out:?}");
        assert!(out.stdout.contains(
            "size=1536 backing_file=base.raw backing_fmt=raw lazy_refcounts=on refcount_bits=16"
        ));
        let layer = chain::open_layer(&top.display().to_string(), None).expect("qcow2");
        let h = layer.header().expect("header");
        assert_eq!(h.size, 1536);
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert!(h.lazy_refcounts());
        let missing_fmt = create(&CreateArgs {
            backing: Some("base.raw".into()),
            ..args("qcow2", &top, None)
        });
        assert!(
            missing_fmt.stderr.contains(
                "Backing file specified without backing format (detected format of raw; pass -F raw)"
            ),
            "{missing_fmt:?}"
        );
    }
}
