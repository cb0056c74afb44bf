{
  # kiln for Nix users: the `kiln` binary, the guest kernel built from the same config fragment
  # as `kiln guest build --from-source` (guest/kernel/kiln.config), an initramfs with the static
  # kiln-agent as /init, a NixOS module running the agent as a service, and checks.
  #
  # flake.lock is the determinism pin: the first user with Nix generates it (`nix flake lock`)
  # and commits it; CI never runs `nix flake update`.
  description = "kiln: a microVM test harness with its own embedded VMM";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      lib = nixpkgs.lib;

      version = "0.1.0";
      src = lib.cleanSource ./.;
      cargoLock.lockFile = ./Cargo.lock;

      # kiln.config as an attribute set (CONFIG_X = "y"), for linuxManualConfig's feature checks
      # without reading the generated .config back (no import-from-derivation).
      kilnConfigFile = ./guest/kernel/kiln.config;
      kilnConfig =
        let
          lines = lib.splitString "\n" (builtins.readFile kilnConfigFile);
          settings = builtins.filter (l: builtins.match "CONFIG_[A-Za-z0-9_]+=.*" l != null) lines;
          pair = l:
            let m = builtins.match "(CONFIG_[A-Za-z0-9_]+)=(.*)" l;
            in lib.nameValuePair (builtins.elemAt m 0) (builtins.elemAt m 1);
        in
        builtins.listToAttrs (map pair settings);

      kernelBase = pkgs.linux_6_6;
    in
    {
      packages.${system} = rec {
        default = kiln;

        kiln = pkgs.rustPlatform.buildRustPackage {
          pname = "kiln";
          inherit version src cargoLock;
          cargoBuildFlags = [ "-p" "kiln" ];
          # The workspace tests need /dev/kvm or QEMU; `checks` runs them.
          doCheck = false;
        };

        # The agent must be static: the initramfs has no dynamic loader. musl via pkgsStatic.
        kiln-agent = pkgs.pkgsStatic.rustPlatform.buildRustPackage {
          pname = "kiln-agent";
          inherit version src cargoLock;
          cargoBuildFlags = [ "-p" "kiln-agent" ];
          doCheck = false;
        };

        # `make tinyconfig` + kiln.config, exactly as `kiln guest build --from-source` does.
        guest-kernel-config = pkgs.stdenv.mkDerivation {
          pname = "kiln-guest-kernel-config";
          inherit (kernelBase) version src;
          nativeBuildInputs = with pkgs; [ flex bison bc perl ];
          dontConfigure = true;
          buildPhase = ''
            runHook preBuild
            make tinyconfig
            scripts/kconfig/merge_config.sh -m .config ${kilnConfigFile}
            make olddefconfig
            runHook postBuild
          '';
          installPhase = "cp .config $out";
        };

        guest-kernel = pkgs.linuxManualConfig {
          inherit (kernelBase) src version modDirVersion;
          configfile = guest-kernel-config;
          # Everything is built in; no module tree to install.
          config = kilnConfig // { CONFIG_MODULES = "n"; };
        };

        # The agent as /init and a static busybox for `sh -c` steps. The kernel's built-in
        # initramfs already provides /dev/console.
        guest-initrd = pkgs.makeInitrd {
          name = "kiln-guest-initrd";
          compressor = "gzip";
          contents = [
            { object = "${kiln-agent}/bin/kiln-agent"; symlink = "/init"; }
            { object = "${pkgs.pkgsStatic.busybox}/bin"; symlink = "/bin"; }
          ];
        };

        # The NixOS guest (nixosConfigurations.kiln-guest) as a bootable kernel + initrd pair.
        nixos-guest = self.nixosConfigurations.kiln-guest.config.system.build.toplevel;
      };

      # Run kiln-agent as a service in a full NixOS guest: readiness record on the serial
      # console, shares mounted by tag.
      nixosModules.kiln-guest = { config, lib, pkgs, ... }:
        let
          cfg = config.services.kiln-agent;
        in
        {
          options.services.kiln-agent = {
            enable = lib.mkEnableOption "the kiln guest agent";
            package = lib.mkOption {
              type = lib.types.package;
              default = self.packages.${system}.kiln-agent;
              description = "The kiln-agent package.";
            };
            console = lib.mkOption {
              type = lib.types.str;
              default = "/dev/ttyS0";
              description = "Where the agent prints its KILN_READY record (the serial console the host watches).";
            };
            shareType = lib.mkOption {
              type = lib.types.enum [ "virtiofs" "9p" ];
              default = "virtiofs";
              description = "virtiofs under kiln's VMM, 9p under QEMU.";
            };
            shares = lib.mkOption {
              type = lib.types.attrsOf (lib.types.submodule {
                options = {
                  mountPoint = lib.mkOption { type = lib.types.str; };
                  readOnly = lib.mkOption { type = lib.types.bool; default = false; };
                };
              });
              default = { };
              example = { fixtures = { mountPoint = "/fixtures"; }; };
              description = "Host shares by tag.";
            };
          };

          config = lib.mkIf cfg.enable {
            boot.kernelParams = [ "console=ttyS0" ];
            boot.initrd.availableKernelModules = [
              "virtio_pci" "virtio_mmio" "virtio_blk" "virtio_console" "9p" "9pnet_virtio" "virtiofs"
            ];
            boot.kernelModules = [ "vmw_vsock_virtio_transport" "virtio_console" "virtio_rng" ];

            fileSystems = lib.mapAttrs'
              (tag: share: lib.nameValuePair share.mountPoint {
                device = tag;
                fsType = cfg.shareType;
                options = (lib.optional share.readOnly "ro")
                  ++ (lib.optionals (cfg.shareType == "9p") [ "trans=virtio" "version=9p2000.L" "msize=262144" ]);
              })
              cfg.shares;

            systemd.services.kiln-agent = {
              description = "kiln guest agent";
              wantedBy = [ "multi-user.target" ];
              after = [ "local-fs.target" "systemd-modules-load.service" ];
              serviceConfig = {
                ExecStart = "${cfg.package}/bin/kiln-agent";
                Restart = "always";
                StandardOutput = "tty";
                StandardError = "journal";
                TTYPath = cfg.console;
              };
            };
          };
        };

      nixosConfigurations.kiln-guest = nixpkgs.lib.nixosSystem {
        inherit system;
        modules = [
          self.nixosModules.kiln-guest
          ({ ... }: {
            services.kiln-agent.enable = true;
            services.kiln-agent.shareType = "9p";
            services.kiln-agent.shares.fixtures.mountPoint = "/fixtures";
            boot.loader.grub.enable = false;
            fileSystems."/" = { device = "tmpfs"; fsType = "tmpfs"; };
            networking.hostName = "kiln";
            system.stateVersion = "24.11";
          })
        ];
      };

      devShells.${system}.default = pkgs.mkShell {
        inputsFrom = [ self.packages.${system}.kiln ];
        packages = with pkgs; [
          cargo rustc clippy rustfmt
          qemu acpica-tools binutils busybox
          flex bison bc perl elfutils openssl
        ];
      };

      checks.${system} = {
        # The end-to-end scenario of tests/guest_qemu.rs (exec, put/get, a 9p share, shutdown)
        # against the Nix-built guest kernel and initramfs, under QEMU TCG in the sandbox.
        guest-qemu = self.packages.${system}.kiln.overrideAttrs (old: {
          pname = "kiln-check-guest-qemu";
          doCheck = true;
          nativeCheckInputs = [ pkgs.qemu ];
          cargoTestFlags = [ "-p" "kiln" "--test" "guest_qemu" ];
          KILN_GUEST_KERNEL = "${self.packages.${system}.guest-kernel}/bzImage";
          KILN_GUEST_INITRD = "${self.packages.${system}.guest-initrd}/initrd";
        });
      };
    };
}
