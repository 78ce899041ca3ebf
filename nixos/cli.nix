# programs.homelab-deploy: the CLI for users, with a system config file it reads
# (/etc/homelab-deploy/config.toml; flags, env and ~/.config/homelab-deploy/config.toml win).
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.programs.homelab-deploy;
  settingsFormat = pkgs.formats.toml { };
in
{
  options.programs.homelab-deploy = {
    enable = mkEnableOption "the homelab-deploy CLI";
    package = lib.mkPackageOption pkgs "homelab-deploy" { };
    natsUrl = mkOption { type = types.str; default = "nats://127.0.0.1:4222"; description = "NATS server URL(s)."; };
    nkeySeedFile = mkOption { type = types.nullOr types.str; default = null; description = "NKey user seed file the CLI authenticates with."; };
    inboxPrefix = mkOption { type = types.nullOr (types.strMatching "[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+)*"); default = null; example = "_INBOX_alice"; description = "Prefix of the CLI's reply subjects instead of `_INBOX`: the one its NATS user may subscribe to (nats/prod.example.conf)."; };
  };

  config = mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    environment.etc."homelab-deploy/config.toml".source = settingsFormat.generate "homelab-deploy-cli.toml"
      ({ nats_url = cfg.natsUrl; }
        // lib.optionalAttrs (cfg.nkeySeedFile != null) { nkey_file = cfg.nkeySeedFile; }
        // lib.optionalAttrs (cfg.inboxPrefix != null) { inbox_prefix = cfg.inboxPrefix; });
  };
}
