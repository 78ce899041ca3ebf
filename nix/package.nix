# The homelab-deploy binary, built from Cargo.lock.
{ lib, stdenv, rustPlatform, installShellFiles, pkg-config, openssl }:
rustPlatform.buildRustPackage {
  pname = "homelab-deploy";
  version = (builtins.fromTOML (builtins.readFile ../Cargo.toml)).workspace.package.version;

  # cleanSourceWith rather than lib.fileset: it also evaluates with Nix older than 2.14.
  src = lib.cleanSourceWith {
    src = lib.cleanSource ../.;
    filter = path: _type: !(builtins.elem (baseNameOf path) [ "target" ".tools" ".demo" ]);
  };
  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ pkg-config installShellFiles ];
  buildInputs = [ openssl ];

  cargoBuildFlags = [ "--package" "homelab-deploy" ];
  # Unit tests only: the end-to-end tests need a nats-server, a writable nix store and git repos,
  # which the build sandbox does not have. They run with ./scripts/test (and the flake's checks
  # build this package, which runs the unit tests).
  cargoTestFlags = [ "--workspace" "--lib" "--bins" ];

  # Completions and man pages come from the clap definitions, so they always match --help.
  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    for shell in bash fish zsh; do
      $out/bin/homelab-deploy completions $shell > homelab-deploy.$shell
    done
    installShellCompletion homelab-deploy.{bash,fish,zsh}
    $out/bin/homelab-deploy man --out-dir man
    installManPage man/*.1
  '';

  meta = {
    description = "Build NixOS hosts of flake repos on a fleet of builders over NATS";
    license = lib.licenses.mit;
    mainProgram = "homelab-deploy";
    platforms = lib.platforms.linux;
  };
}
