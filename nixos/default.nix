# All homelab-deploy NixOS modules (the flake's nixosModules.default).
{
  imports = [ ./builder.nix ./scheduled-builds.nix ./cli.nix ./dashboard.nix ];
}
