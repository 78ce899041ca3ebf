# The parts of flake.nix that need no nixpkgs: output names, the overlay, and the NixOS module
# (evaluated with the stubs). nixpkgs itself cannot be fetched here; see docs/flake.md.
{ libPath }:
let
  lib = import libPath;
  flake = import ../../flake.nix;
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (_: throw "nixpkgs is not available here");
  };
  outputs = flake.outputs { self = outputs; inherit nixpkgs; };
  system = lib.evalModules {
    modules = [
      ./stubs.nix
      outputs.nixosModules.default
      { services.homelab-deploy.builder = { enable = true; repos.example.url = "git+file:///srv/example"; }; }
    ];
  };
  # nix/package.nix with buildRustPackage replaced by the identity: what it would be given.
  package = import ../../nix/package.nix {
    inherit lib;
    rustPlatform.buildRustPackage = args: args;
    stdenv = { buildPlatform.canExecute = _: true; hostPlatform = { }; };
    installShellFiles = "installShellFiles";
    pkg-config = "pkg-config";
    openssl = "openssl";
  };
in
{
  package = {
    inherit (package) pname version cargoBuildFlags postInstall nativeBuildInputs;
    lockFile = builtins.pathExists package.cargoLock.lockFile;
    srcHasLock = builtins.pathExists "${package.src}/Cargo.lock";
    srcHasCli = builtins.pathExists "${package.src}/crates/cli/src/main.rs";
  };
  inputs = builtins.attrNames flake.inputs;
  packages = builtins.attrNames outputs.packages.x86_64-linux;
  apps = builtins.attrNames outputs.apps.x86_64-linux;
  devShells = builtins.attrNames outputs.devShells.x86_64-linux;
  checks = builtins.attrNames outputs.checks.x86_64-linux;
  nixosModules = builtins.attrNames outputs.nixosModules;
  overlayIsFunction = builtins.isFunction outputs.overlays.default;
  overlayCount = builtins.length system.config.nixpkgs.overlays;
  builderPackage = system.config.services.homelab-deploy.builder.package.name;
  builderUnit = system.config.systemd.services ? homelab-deploy-builder;
}
