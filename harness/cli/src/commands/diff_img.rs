//! The `kiln diff …` command line.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use kiln_diff::log::{write_log, Provenance};
use kiln_diff::ops::{diff_images, Target, ALL_OPS, DEFAULT_OPS};
use kiln_diff::profile::SelectError;
use kiln_img::Profile;

use crate::exit;

/// `kiln diff` subcommands.
#[derive(Debug, Subcommand)]
pub enum DiffCommand {
    /// Run kiln img and qemu-img on images and report every divergence.
    #[command(
        after_help = "Examples:\n  kiln diff img --generate 30 --seed 4242\n  kiln diff img --generate 200 --seed 2024 --qemu-img ~/.cache/kiln/qemu-img-7.2/VERSION/qemu-img --log diff-log"
    )]
    Img(DiffImgArgs),
    /// Run scenarios on kiln's VMM and on QEMU and compare every fact of the two runs.
    #[command(after_help = "Example:\n  kiln diff run scenarios/ --retries 1")]
    Run(super::diff_run::DiffRunArgs),
}

/// Arguments of `kiln diff img`.
#[derive(Debug, Args)]
pub struct DiffImgArgs {
    /// Operations to compare (comma-separated): info, check, map, compare, create, convert
    /// (default: the first four).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_OPS.iter().map(|s| s.to_string()))]
    ops: Vec<String>,
    /// The qemu-img to compare with (a path, or a name looked up on PATH); its `--version`
    /// picks the profile.
    #[arg(long, value_name = "PATH", default_value = "qemu-img")]
    qemu_img: String,
    /// The profile to compare with (7.2 or 10.0); refused unless it is the qemu-img's version's.
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
    /// Save every DIVERGENT and tolerated finding in DIR as one JSON file (versions, profile,
    /// how the image was made, the operation, both outputs), and summary.json.
    #[arg(long, value_name = "DIR")]
    log: Option<PathBuf>,
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
/// errors (a `--profile` that is not the qemu-img's version's among them), UNAVAILABLE when
/// qemu-img is missing or of a version kiln has no profile for (nothing could be compared),
/// ERROR when `--log` could not be written.
pub fn run(cmd: DiffCommand) -> i32 {
    match cmd {
        DiffCommand::Img(a) => diff_img(a),
        DiffCommand::Run(a) => super::diff_run::run(a),
    }
}

/// The one line `kiln diff img` prints when it will not compare with this qemu-img.
fn select_error_line(e: &SelectError) -> String {
    match e {
        SelectError::Mismatch {
            requested,
            qemu_img,
            version,
            own,
        } => format!(
            "--profile {requested} does not match {qemu_img} (qemu-img version {version}): pass \
             {}--qemu-img naming a qemu-img {requested}{}",
            own.map_or(String::new(), |p| format!("--profile {p} or ")),
            if *requested == Profile::V7_2 {
                " (.ci/qemu-img-7.2 fetches Debian's)"
            } else {
                ""
            }
        ),
        SelectError::NoProfile { .. } => {
            format!("{e}: pass --qemu-img naming a qemu-img of one of those")
        }
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
    // Settled before the corpus is built: a wrong profile would only report version
    // differences as DIVERGENT.
    let target = match Target::detect(&a.qemu_img, profile) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kiln: error: {}", select_error_line(&e));
            return match e {
                SelectError::Mismatch { .. } => exit::USAGE,
                SelectError::NoProfile { .. } => exit::UNAVAILABLE,
            };
        }
    };
    if let Some(dir) = &a.log {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("kiln: error: --log {}: {e}", dir.display());
            return exit::USAGE;
        }
    }
    let mut provenance = Provenance::default();
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
            provenance.generated = Some((n, seed));
            match kiln_diff::generate::generate(&dir, n, seed) {
                Ok(c) => c
                    .into_iter()
                    .map(|i| {
                        let path = i.path.display().to_string();
                        provenance
                            .recipes
                            .insert(path.clone(), (i.recipe, i.commands));
                        path
                    })
                    .collect(),
                Err(e) => {
                    eprintln!("kiln: error: generating corpus: {e}");
                    return if target.detected.is_none() {
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
    let report = diff_images(&target, &images, &a.ops);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json()).unwrap_or_default()
        );
    } else {
        print!("{}", report.to_text(a.verbose));
    }
    if let Some(dir) = &a.log {
        if let Err(e) = write_log(dir, &report, &provenance) {
            eprintln!("kiln: error: --log: {e}");
            return exit::ERROR;
        }
    }
    if report.divergent() > 0 {
        exit::FAILURES
    } else if report.version.is_none() {
        exit::UNAVAILABLE
    } else {
        exit::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_names_both_and_the_way_out() {
        let e = SelectError::Mismatch {
            requested: Profile::V7_2,
            qemu_img: "/usr/bin/qemu-img".into(),
            version: "10.0.2".into(),
            own: Some(Profile::V10_0),
        };
        assert_eq!(
            select_error_line(&e),
            "--profile 7.2 does not match /usr/bin/qemu-img (qemu-img version 10.0.2): pass \
             --profile 10.0 or --qemu-img naming a qemu-img 7.2 (.ci/qemu-img-7.2 fetches \
             Debian's)"
        );
        let e = SelectError::NoProfile {
            qemu_img: "/opt/q".into(),
            version: "9.1.0".into(),
        };
        assert_eq!(
            select_error_line(&e),
            "/opt/q is qemu-img version 9.1.0; kiln has output profiles for 7.2 and 10.0 only: \
             pass --qemu-img naming a qemu-img of one of those"
        );
    }
}
