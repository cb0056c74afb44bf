//! The `kiln img …` command line (clap arguments and dispatch).

use clap::{Args, Subcommand, ValueEnum};

use kiln_img::Profile;

/// `--output human|json`, as qemu-img spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// `kiln img` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImgCommand {
    /// Describe an image like `qemu-img info`.
    #[command(
        after_help = "Examples:\n  kiln img info disk.qcow2\n  kiln img info --output json --backing-chain overlay.qcow2"
    )]
    Info {
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
        /// Describe every image of the backing chain.
        #[arg(long)]
        backing_chain: bool,
        #[command(flatten)]
        profile: ProfileArg,
        file: String,
    },
    /// Check metadata consistency like `qemu-img check` (exit 0/2/3; never repairs).
    #[command(after_help = "Example:\n  kiln img check --output json disk.qcow2")]
    Check {
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
        #[command(flatten)]
        profile: ProfileArg,
        file: String,
    },
    /// Print the allocation map like `qemu-img map`.
    #[command(after_help = "Example:\n  kiln img map --output json disk.qcow2")]
    Map {
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
        #[command(flatten)]
        profile: ProfileArg,
        file: String,
    },
    /// Compare guest-visible contents like `qemu-img compare` (exit 0 same, 1 different, 2 error).
    #[command(
        after_help = "Examples:\n  kiln img compare a.qcow2 b.raw\n  kiln img compare -s a.qcow2 b.qcow2"
    )]
    Compare {
        /// Strict mode: sizes and allocation status must match too.
        #[arg(short = 's')]
        strict: bool,
        #[command(flatten)]
        profile: ProfileArg,
        a: String,
        b: String,
    },
    /// Create a raw or qcow2 image like `qemu-img create` (imago writes it).
    #[command(
        after_help = "Examples:\n  kiln img create -f qcow2 disk.qcow2 10G\n  kiln img create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2"
    )]
    Create {
        /// Image format: raw or qcow2.
        #[arg(short = 'f', default_value = "raw")]
        fmt: String,
        /// Backing file (qcow2 only), stored as given, opened relative to FILE's directory.
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format (raw or qcow2); required with -b, as in qemu-img 7.2+.
        #[arg(short = 'F')]
        backing_fmt: Option<String>,
        /// Options: cluster_size, compat, lazy_refcounts, refcount_bits, extended_l2=off,
        /// compression_type=zlib, preallocation=off, size, backing_file, backing_fmt.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Do not print the "Formatting" line.
        #[arg(short = 'q')]
        quiet: bool,
        #[command(flatten)]
        profile: ProfileArg,
        file: String,
        /// Size in bytes, or with a suffix k, M, G, T, P, E (taken from the backing file when
        /// omitted).
        size: Option<String>,
    },
    /// Convert an image (its whole backing chain, flattened) to raw or qcow2 like
    /// `qemu-img convert`.
    #[command(after_help = "Example:\n  kiln img convert -O raw disk.qcow2 disk.raw")]
    Convert {
        /// Source format (probed when omitted).
        #[arg(short = 'f')]
        src_fmt: Option<String>,
        /// Output format: raw or qcow2.
        #[arg(short = 'O', default_value = "raw")]
        out_fmt: String,
        /// Quiet (kiln prints nothing on success anyway).
        #[arg(short = 'q')]
        quiet: bool,
        src: String,
        dst: String,
    },
}

/// `--profile 7.2|10.0`; default: the installed qemu-img's, else the newest.
#[derive(Debug, Args)]
pub struct ProfileArg {
    /// qemu-img output profile to answer in (7.2 or 10.0).
    #[arg(long, value_parser = parse_profile)]
    profile: Option<Profile>,
}

/// A `--profile` kiln has no answers for.
#[derive(Debug, thiserror::Error)]
#[error("unknown profile '{0}': expected 7.2 or 10.0")]
struct UnknownProfile(String);

fn parse_profile(s: &str) -> Result<Profile, UnknownProfile> {
    Profile::parse(s).ok_or_else(|| UnknownProfile(s.to_string()))
}

impl ProfileArg {
    fn resolve(&self) -> Profile {
        self.profile.unwrap_or_else(|| {
            kiln_diff::profile::detect("qemu-img")
                .ok()
                .and_then(|d| d.profile)
                .unwrap_or(Profile::newest())
        })
    }
}

/// Runs one `kiln img` command, printing like qemu-img; returns qemu-img's exit status
/// (crate::exit::img).
pub fn run(cmd: ImgCommand) -> i32 {
    let out = match cmd {
        ImgCommand::Info {
            output,
            backing_chain,
            profile,
            file,
        } => kiln_img::info(
            &file,
            output == OutputFormat::Json,
            backing_chain,
            profile.resolve(),
        ),
        ImgCommand::Check { output, file, .. } => {
            kiln_img::check(&file, output == OutputFormat::Json)
        }
        ImgCommand::Map {
            output,
            profile,
            file,
        } => kiln_img::map(&file, output == OutputFormat::Json, profile.resolve()),
        ImgCommand::Compare {
            strict,
            profile,
            a,
            b,
        } => kiln_img::compare(&a, &b, strict, profile.resolve()),
        ImgCommand::Create {
            fmt,
            backing,
            backing_fmt,
            options,
            quiet,
            profile,
            file,
            size,
        } => kiln_img::create(&kiln_img::CreateArgs {
            fmt,
            file,
            size,
            backing,
            backing_fmt,
            options,
            quiet,
            profile: profile.resolve(),
        }),
        ImgCommand::Convert {
            src_fmt,
            out_fmt,
            src,
            dst,
            ..
        } => kiln_img::convert(&kiln_img::ConvertArgs {
            src_fmt,
            out_fmt,
            src,
            dst,
        }),
    };
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    out.code
}
