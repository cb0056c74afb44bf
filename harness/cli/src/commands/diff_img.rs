//! The `kiln diff …` command line.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use kiln_diff::ops::{diff_images, ALL_OPS, DEFAULT_OPS};
use kiln_img::Profile;

use crate::exit;

/// `kiln diff` subcommands.
#[derive(Debug, Subcommand)]
pub enum DiffCommand {
    /// Run kiln img and qemu-img on images and report every divergence.
    Img(DiffImgArgs),
    /// Run scenarios on kiln's VMM and on QEMU and compare every fact of the two runs.
    Run(super::diff_run::DiffRunArgs),
}

/// Arguments of `kiln diff img`.
#[derive(Debug, Args)]
pub struct DiffImgArgs {
    /// Operations to compare (comma-separated): info, check, map, compare, create, convert
    /// (default: the first four).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_OPS.iter().map(|s| s.to_string()))]
    ops: Vec<String>,
    /// The qemu-img to compare with.
    #[arg(long, default_value = "qemu-img")]
    qemu_img: String,
    /// Compare with this profile instead of the detected one (7.2 or 10.0).
    #[arg(long)]
    profile: Option<String>,
    /// Generate a corpus of N images instead of naming images.
    #[arg(long, value_name = "N", requires = "seed")]
    generate: Option<usize>,
    /// Seed for --generate (the same seed gives the same corpus).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Keep the generated corpus in DIR (default: a temporary directory, removed after).
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Machine-readable JSON report.
    #[arg(long)]
    json: bool,
    /// List identical results too.
    #[arg(long, short)]
    verbose: bool,
    /// Images to compare.
    #[arg(conflicts_with = "generate")]
    images: Vec<String>,
}

/// Runs `kiln diff`: SUCCESS when nothing is DIVERGENT, FAILURES otherwise, USAGE on usage
/// errors, UNAVAILABLE when qemu-img is missing (nothing could be compared).
pub fn run(cmd: DiffCommand) -> i32 {
    match cmd {
        DiffCommand::Img(a) => diff_img(a),
        DiffCommand::Run(a) => super::diff_run::run(a),
    }
}

fn diff_img(a: DiffImgArgs) -> i32 {
    for op in &a.ops {
        if !ALL_OPS.contains(&op.as_str()) {
            eprintln!(
                "kiln: error: --ops {op}: expected one of {}",
                ALL_OPS.join(", ")
            );
            return exit::USAGE;
        }
    }
    let profile = match a.profile.as_deref().map(|p| Profile::parse(p).ok_or(p)) {
        Some(Err(p)) => {
            eprintln!("kiln: error: --profile {p}: expected 7.2 or 10.0");
            return exit::USAGE;
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let mut _tmp = None;
    let images: Vec<String> = match a.generate {
        Some(n) => {
            let dir = match &a.keep {
                Some(d) => d.clone(),
                None => match kiln_diff::TempDir::new("kiln-diff-img") {
                    Ok(t) => {
                        let p = t.path().to_path_buf();
                        _tmp = Some(t);
                        p
                    }
                    Err(e) => {
                        eprintln!("kiln: error: temporary directory: {e}");
                        return exit::USAGE;
                    }
                },
            };
            let seed = a.seed.unwrap_or(0);
            match kiln_diff::generate::generate(&dir, n, seed) {
                Ok(c) => c
                    .into_iter()
                    .map(|i| i.path.display().to_string())
                    .collect(),
                Err(e) => {
                    eprintln!("kiln: error: generating corpus: {e}");
                    return if kiln_diff::profile::detect(&a.qemu_img).is_err() {
                        exit::UNAVAILABLE
                    } else {
                        exit::USAGE
                    };
                }
            }
        }
        None if a.images.is_empty() => {
            eprintln!("kiln: error: name images to compare, or use --generate N --seed S");
            return exit::USAGE;
        }
        None => a.images.clone(),
    };
    let report = diff_images(&a.qemu_img, &images, &a.ops, profile);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json()).unwrap_or_default()
        );
    } else {
        print!("{}", report.to_text(a.verbose));
    }
    if report.divergent() > 0 {
        exit::FAILURES
    } else if report.version.is_none() {
        exit::UNAVAILABLE
    } else {
        exit::SUCCESS
    }
}
