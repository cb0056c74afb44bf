//! `kiln guest build|list|path|push|pull`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use kiln_guest_build::registry::{self, Reference};
use kiln_guest_build::{build, stderr_progress, Cache, GuestError, KernelFrom, DEFAULT_ALIAS};

/// `kiln guest …`
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Build a guest (kernel + initramfs with kiln-agent) into the cache.
    #[command(
        after_help = "Examples:\n  kiln guest build\n  kiln guest build --from-source /usr/src/linux-source-6.1.tar.xz --alias kiln-config"
    )]
    Build(BuildArgs),
    /// List cached guests.
    #[command(after_help = "Example:\n  kiln guest list")]
    List,
    /// Print the cache directory of a guest (alias, or hash prefix). Without a name: the default
    /// guest as `kiln run` uses it, built (or rebuilt for this kiln) first if needed.
    #[command(after_help = "Examples:\n  kiln guest path\n  kiln guest path kiln-config")]
    Path {
        /// Alias or hash prefix.
        name: Option<String>,
    },
    /// Push a cached guest to an OCI registry (credentials from KILN_REGISTRY_USER and
    /// KILN_REGISTRY_PASSWORD, or `docker login`) and print the reference, pinned by digest,
    /// that runners pull. Plain HTTP for loopback hosts and those in KILN_REGISTRY_PLAIN_HTTP.
    #[command(
        after_help = "Example:\n  KILN_REGISTRY_USER=ci KILN_REGISTRY_PASSWORD=$TOKEN kiln guest push registry.example.com/kiln/guest:v1"
    )]
    Push {
        /// Where: [oci://]HOST[:PORT]/REPOSITORY[:TAG] (tag `latest` when none).
        reference: String,
        /// Which cached guest (alias or hash prefix) [default: the default guest].
        #[arg(long, value_name = "NAME")]
        guest: Option<String>,
    },
    /// Pull a guest from an OCI registry by digest into the cache, verifying every byte, and
    /// print its cache directory. Nothing is fetched when the cache already holds it.
    #[command(
        after_help = "Example:\n  kiln guest pull oci://registry.example.com/kiln/guest@sha256:3f1c…"
    )]
    Pull {
        /// [oci://]HOST[:PORT]/REPOSITORY[:TAG]@sha256:HEX.
        reference: String,
        /// Also name the result (e.g. `default`, which `kiln run` uses).
        #[arg(long, value_name = "NAME")]
        alias: Option<String>,
    },
}

/// Where `kiln guest build` takes the kernel from (one of; default `--from-deb`).
/// `--alias` goes with any of them.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// A Debian/Ubuntu kernel package name or .deb file [default: linux-image-amd64].
    #[arg(long, group = "source", value_name = "PACKAGE|FILE.deb", num_args = 0..=1, default_missing_value = "")]
    from_deb: Option<String>,
    /// The running host's kernel and modules.
    #[arg(long, group = "source")]
    from_host: bool,
    /// Kernel source directory or tarball, built with guest/kernel/kiln.config (minutes).
    #[arg(long, group = "source", value_name = "DIR|TARBALL")]
    from_source: Option<PathBuf>,
    /// Also name the result (e.g. `default`, which `kiln run` uses).
    #[arg(long, value_name = "NAME")]
    alias: Option<String>,
}

impl BuildArgs {
    fn source(&self) -> KernelFrom {
        if self.from_host {
            KernelFrom::Host
        } else if let Some(dir) = &self.from_source {
            KernelFrom::Source(dir.clone())
        } else {
            KernelFrom::Deb(self.from_deb.clone().filter(|p| !p.is_empty()))
        }
    }
}

/// Run a `kiln guest` command; returns the exit code.
pub fn run(command: GuestCommand) -> i32 {
    match execute(command) {
        Ok(()) => crate::exit::SUCCESS,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            crate::exit::ERROR
        }
    }
}

fn execute(command: GuestCommand) -> Result<(), GuestError> {
    let cache = Cache::default_location()?;
    match command {
        GuestCommand::Build(args) => {
            let from = args.source();
            let _lock = cache.lock()?;
            let image = build(&cache, &from, &stderr_progress)?;
            // The default package is what `kiln run` would build: name it the default too.
            let alias = args
                .alias
                .or_else(|| (from == KernelFrom::default()).then(|| DEFAULT_ALIAS.to_owned()));
            if let Some(alias) = alias {
                cache.set_alias(&alias, &image.manifest.name)?;
            }
            println!("{}", image.dir.display());
        }
        GuestCommand::List => {
            let aliases = cache.aliases();
            for image in cache.list() {
                let names: Vec<_> = aliases
                    .iter()
                    .filter(|(_, entry)| *entry == image.manifest.name)
                    .map(|(alias, _)| alias.as_str())
                    .collect();
                println!(
                    "{}  {:<24} {:<40} {}",
                    image.manifest.name,
                    image.manifest.kernel_release.as_deref().unwrap_or("?"),
                    describe(&image.manifest.source),
                    names.join(",")
                );
            }
        }
        GuestCommand::Path { name } => {
            let image = match name {
                Some(name) => cache.find(&name)?,
                None => kiln_guest_build::default_guest_in(&cache, &stderr_progress)?,
            };
            println!("{}", image.dir.display());
        }
        GuestCommand::Push { reference, guest } => {
            let reference = Reference::parse(&reference)?;
            let image = match guest {
                Some(name) => cache.find(&name)?,
                None => kiln_guest_build::default_guest_in(&cache, &stderr_progress)?,
            };
            let pushed = registry::push(&image, &reference, &stderr_progress)?;
            println!("{pushed}");
        }
        GuestCommand::Pull { reference, alias } => {
            let reference = Reference::parse(&reference)?;
            let image = registry::pull(&cache, &reference, &stderr_progress)?;
            if let Some(alias) = alias {
                cache.set_alias(&alias, &image.manifest.name)?;
            }
            println!("{}", image.dir.display());
        }
    }
    Ok(())
}

fn describe(source: &kiln_guest_build::Source) -> String {
    match source {
        kiln_guest_build::Source::Deb {
            package, version, ..
        } => format!("deb {package} {version}"),
        kiln_guest_build::Source::Host { release } => format!("host {release}"),
        kiln_guest_build::Source::KernelSource { path, .. } => format!("source {path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(subcommand)]
        command: GuestCommand,
    }

    fn build(argv: &[&str]) -> Result<BuildArgs, clap::Error> {
        let mut full = vec!["kiln-guest", "build"];
        full.extend_from_slice(argv);
        match Wrapper::try_parse_from(full)?.command {
            GuestCommand::Build(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn alias_goes_with_every_source_and_the_sources_exclude_each_other() {
        for source in [
            &["--from-deb"][..],
            &["--from-host"],
            &["--from-source", "linux.tar.xz"],
        ] {
            let mut argv = source.to_vec();
            argv.extend(["--alias", "mine"]);
            let args = build(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(args.alias.as_deref(), Some("mine"));
        }
        assert!(matches!(
            build(&["--from-source", "linux.tar.xz"]).map(|a| a.source()),
            Ok(KernelFrom::Source(_))
        ));
        let err = build(&["--from-host", "--from-source", "x"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }
}
