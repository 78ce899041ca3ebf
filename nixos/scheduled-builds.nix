# services.homelab-deploy.scheduledBuilds.<name>: a timer that asks for a build; the oneshot
# service fails (so `systemctl --failed` and alerting see it) when the build fails.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption types literalExpression;
  hardening = import ./hardening.nix;
  token = types.strMatching "[A-Za-z0-9_-]{1,64}";
  scheduled = types.submodule {
    options = {
      repo = mkOption { type = token; description = "Repo to build (as configured on the builders)."; };
      target = mkOption { type = types.strMatching "[A-Za-z0-9_-]{1,128}"; default = "all"; description = "A host, or `all`."; };
      onCalendar = mkOption { type = types.str; example = "*-*-* *:30:00"; description = "systemd OnCalendar expression."; };
      mode = mkOption {
        type = types.enum [ "replace" "enqueue" ];
        default = "replace";
        description = "`replace` cancels an older build of the same target still queued or running.";
      };
      randomizedDelaySec = mkOption { type = types.ints.unsigned; default = 0; description = "systemd RandomizedDelaySec."; };
      timeoutSec = mkOption { type = types.ints.positive; default = 10800; description = "How long to wait for the build."; };
      natsUrl = mkOption { type = types.str; default = "nats://127.0.0.1:4222"; description = "NATS server URL(s)."; };
      nkeySeedFile = mkOption { type = types.nullOr types.str; default = null; description = "NKey user seed to authenticate with (passed as a systemd credential)."; };
      inboxPrefix = mkOption { type = types.nullOr (types.strMatching "[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+)*"); default = null; example = "_INBOX_ci"; description = "Prefix of the build's reply subjects instead of `_INBOX`: the one its NATS user may subscribe to (nats/prod.example.conf)."; };
      package = mkOption {
        type = types.package;
        default = config.programs.homelab-deploy.package;
        defaultText = literalExpression "config.programs.homelab-deploy.package";
        description = "The homelab-deploy package the timer runs.";
      };
    };
  };
in
{
  options.services.homelab-deploy.scheduledBuilds = mkOption {
    type = types.attrsOf scheduled;
    default = { };
    example = literalExpression ''{ nixos-servers = { repo = "nixos-servers"; onCalendar = "*-*-* *:30:00"; }; }'';
    description = "Builds asked for on a schedule, one timer each.";
  };

  config = {
    systemd.services = lib.mapAttrs' (name: job: lib.nameValuePair "homelab-deploy-build-${name}" {
      description = "homelab-deploy scheduled build ${name}: ${job.repo} ${job.target}";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = { HOMELAB_DEPLOY_NATS_URL = job.natsUrl; }
        // lib.optionalAttrs (job.nkeySeedFile != null) { HOMELAB_DEPLOY_NKEY_FILE = "%d/nkey"; }
        // lib.optionalAttrs (job.inboxPrefix != null) { HOMELAB_DEPLOY_INBOX_PREFIX = job.inboxPrefix; };
      serviceConfig = {
        Type = "oneshot";
        ExecStart = "${job.package}/bin/homelab-deploy build ${job.repo} ${job.target} --mode ${job.mode} --priority scheduled --quiet --timeout ${toString job.timeoutSec}";
        DynamicUser = true;
      } // hardening.basic // lib.optionalAttrs (job.nkeySeedFile != null) { LoadCredential = [ "nkey:${job.nkeySeedFile}" ]; };
    }) config.services.homelab-deploy.scheduledBuilds;

    systemd.timers = lib.mapAttrs' (name: job: lib.nameValuePair "homelab-deploy-build-${name}" {
      description = "homelab-deploy scheduled build ${name}";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = job.onCalendar;
        Persistent = true;
        RandomizedDelaySec = job.randomizedDelaySec;
      };
    }) config.services.homelab-deploy.scheduledBuilds;
  };
}
