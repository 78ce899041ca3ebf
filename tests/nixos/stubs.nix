# The few NixOS options and packages the homelab-deploy modules use, for evaluating them with the
# real module system from nixpkgs' lib alone (no nixpkgs here). `pkgs.formats.toml` renders TOML
# with a small Nix function and `builtins.toFile`, so tests can read the file back.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };
  toTOML = value:
    let
      quoteKey = key: if builtins.match "[A-Za-z0-9_-]+" key != null then key else builtins.toJSON key;
      scalar = v:
        if builtins.isBool v then (if v then "true" else "false")
        else if builtins.isInt v || builtins.isFloat v then toString v
        else if builtins.isList v then "[ ${lib.concatMapStringsSep ", " scalar v} ]"
        else builtins.toJSON (toString v);
      render = path: attrs:
        let
          scalars = lib.filterAttrs (_: v: !builtins.isAttrs v) attrs;
          tables = lib.filterAttrs (_: v: builtins.isAttrs v) attrs;
          header = if path == [ ] || scalars == { } then "" else "\n[${lib.concatMapStringsSep "." quoteKey path}]\n";
        in
        header
        + lib.concatStrings (lib.mapAttrsToList (k: v: "${quoteKey k} = ${scalar v}\n") scalars)
        + lib.concatStrings (lib.mapAttrsToList (k: v: render (path ++ [ k ]) v) tables);
    in
    render [ ] value;
  pkgs = {
    homelab-deploy = fakePackage "homelab-deploy";
    git = fakePackage "git";
    openssh = fakePackage "openssh";
    # What nix/package.nix would build, from the host's own nixpkgs (the flake's module).
    callPackage = path: _: fakePackage "homelab-deploy-callPackage-${baseNameOf (toString path)}";
    formats.toml = { }: {
      type = types.attrsOf types.anything;
      generate = name: value: builtins.toFile name (toTOML value);
    };
  };
in
{
  options = {
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    systemd.services = mkOption { type = types.attrsOf types.anything; default = { }; };
    systemd.timers = mkOption { type = types.attrsOf types.anything; default = { }; };
    systemd.paths = mkOption { type = types.attrsOf types.anything; default = { }; };
    systemd.package = mkOption { type = types.package; default = fakePackage "systemd"; };
    users.users = mkOption { type = types.attrsOf types.anything; default = { }; };
    users.groups = mkOption { type = types.attrsOf types.anything; default = { }; };
    environment.etc = mkOption { type = types.attrsOf types.anything; default = { }; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
    networking.hostName = mkOption { type = types.str; default = "testhost"; };
    networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    nix.package = mkOption { type = types.package; default = fakePackage "nix"; };
    # NixOS' nix.settings is freeform too; `extra-allowed-users` is what the builder module sets.
    nix.settings = mkOption { type = types.attrsOf types.anything; default = { }; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    nixpkgs.overlays = mkOption { type = types.listOf types.unspecified; default = [ ]; };
  };
  config._module.args.pkgs = pkgs;
}
