# services.homelab-deploy.dashboard: the read-only live web page (docs/dashboard.md) as a
# hardened systemd service. It only reads NATS; give it the `viewer` user of
# nats/prod.example.conf.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.homelab-deploy.dashboard;
  hardening = import ./hardening.nix;
  port = lib.toInt (lib.last (lib.splitString ":" cfg.listen));
in
{
  options.services.homelab-deploy.dashboard = {
    enable = mkEnableOption "the homelab-deploy dashboard, a read-only live web page of the fleet, the queue and the builds";
    package = lib.mkPackageOption pkgs "homelab-deploy" { };
    listen = mkOption {
      type = types.strMatching ".+:[0-9]{1,5}";
      default = "127.0.0.1:9974";
      description = ''
        Address and port of the page (plain HTTP, no login): keep it on loopback, or put an
        authenticating TLS proxy in front.
      '';
    };
    natsUrl = mkOption { type = types.str; default = "nats://127.0.0.1:4222"; description = "NATS server URL(s), comma-separated."; };
    nkeySeedFile = mkOption {
      # A string, not a path: a path literal would copy the seed into the world-readable store.
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/homelab-deploy/viewer.nk";
      description = "File with the NKey user seed of a read-only NATS user (passed to the service with LoadCredential).";
    };
    inboxPrefix = mkOption { type = types.nullOr (types.strMatching "[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+)*"); default = null; example = "_INBOX_viewer"; description = "Prefix of the dashboard's reply subjects instead of `_INBOX`: the one its NATS user may subscribe to (nats/prod.example.conf)."; };
    maxClients = mkOption { type = types.ints.between 1 1024; default = 32; description = "Most live pages served at once; more get HTTP 503."; };
    openFirewall = mkOption { type = types.bool; default = false; description = "Open the dashboard's port in the firewall."; };
  };

  config = mkIf cfg.enable {
    networking.firewall.allowedTCPPorts = lib.optional cfg.openFirewall port;

    systemd.services.homelab-deploy-dashboard = {
      description = "homelab-deploy dashboard";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = { HOMELAB_DEPLOY_NATS_URL = cfg.natsUrl; }
        // lib.optionalAttrs (cfg.inboxPrefix != null) { HOMELAB_DEPLOY_INBOX_PREFIX = cfg.inboxPrefix; };
      serviceConfig = {
        ExecStart = lib.escapeShellArgs ([
          "${cfg.package}/bin/homelab-deploy" "dashboard"
          "--listen" cfg.listen
          "--max-clients" (toString cfg.maxClients)
        ] ++ lib.optionals (cfg.nkeySeedFile != null) [ "--nkey-file" "%d/nkey" ]);
        LoadCredential = lib.optional (cfg.nkeySeedFile != null) "nkey:${cfg.nkeySeedFile}";
        # No state and no files of its own: a user that exists only while it runs.
        DynamicUser = true;
        Restart = "on-failure";
        RestartSec = 5;
        # Unlike the builder it runs no nix: it can also refuse writable code and foreign ABIs.
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
      } // hardening.service;
    };
  };
}
