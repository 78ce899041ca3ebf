{
  description = "homelab-deploy: build NixOS hosts of flake repos on a fleet of builders over NATS";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        homelab-deploy = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        homelab-deploy = pkgs.callPackage ./nix/package.nix { };
        default = homelab-deploy;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.default}/bin/homelab-deploy";
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [ cargo rustc clippy rustfmt cargo-nextest nats-server natscli git pkg-config openssl ];
        };
      });

      # The builder service, scheduled builds and the CLI config. The package is built from the
      # host's own nixpkgs; the host's `nixpkgs.overlays` are left alone (add
      # `overlays.default` yourself to get `pkgs.homelab-deploy` elsewhere).
      nixosModules.default = { lib, pkgs, ... }:
        let package = pkgs.callPackage ./nix/package.nix { };
        in {
          imports = [ ./nixos ];
          services.homelab-deploy.builder.package = lib.mkDefault package;
          programs.homelab-deploy.package = lib.mkDefault package;
          services.homelab-deploy.dashboard.package = lib.mkDefault package;
        };
      nixosModules.homelab-deploy = self.nixosModules.default;

      checks = forAllSystems (pkgs: {
        # Builds the binary and runs the unit tests.
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        # The modules evaluate in a real NixOS system and produce the units.
        nixos-module = (nixpkgs.lib.nixosSystem {
          inherit (pkgs.stdenv.hostPlatform) system;
          modules = [
            self.nixosModules.default
            {
              boot.isContainer = true;
              system.stateVersion = "25.05";
              services.homelab-deploy.builder = {
                enable = true;
                repos.example.url = "git+https://git.example.org/example/nixos.git";
              };
              services.homelab-deploy.scheduledBuilds.example = {
                repo = "example";
                onCalendar = "*-*-* *:30:00";
              };
              programs.homelab-deploy.enable = true;
            }
          ];
        }).config.system.build.toplevel;
      });
    };
}
