# Evaluates the homelab-deploy modules with `config` (a module) and returns what the tests
# check: units, timers, users, /etc files, failed assertions, and the builder's config file.
{ libPath, config }:
let
  lib = import libPath;
  evaluated = lib.evalModules {
    modules = [ ./stubs.nix ../../nixos/default.nix config ];
  };
  cfg = evaluated.config;
  builder = cfg.services.homelab-deploy.builder;
in
{
  services = cfg.systemd.services;
  timers = cfg.systemd.timers;
  paths = cfg.systemd.paths;
  nixSettings = cfg.nix.settings;
  users = cfg.users.users;
  etc = lib.mapAttrs (_: entry: { source = toString entry.source; }) cfg.environment.etc;
  firewall = cfg.networking.firewall.allowedTCPPorts;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
  warnings = cfg.warnings;
  builderConfigFile = if builder.enable then toString builder.configFile else null;
  packages = {
    builder = builder.package.name;
    cli = cfg.programs.homelab-deploy.package.name;
    scheduled = lib.mapAttrs (_: job: job.package.name) cfg.services.homelab-deploy.scheduledBuilds;
  };
}
