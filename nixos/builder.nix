# services.homelab-deploy.builder: the builder daemon as a hardened systemd service.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf mkDefault types literalExpression;
  cfg = config.services.homelab-deploy.builder;
  settingsFormat = pkgs.formats.toml { };
  token = types.strMatching "[A-Za-z0-9_-]{1,64}";
  optional = type: description: mkOption { type = types.nullOr type; default = null; inherit description; };

  repoSettings = types.submodule {
    options = {
      url = mkOption {
        type = types.str;
        example = "git+https://git.example.org/torjus/nixos-servers.git";
        description = "Git URL with nix's `git+` prefix (git+https, git+ssh, git+http, git+file).";
      };
      ref = mkOption { type = types.str; default = "main"; description = "Branch or tag built by default."; };
      push_to = optional types.str "Nix store URI of a binary cache each built host is copied to.";
      push_secret_key_file = optional types.str "Key to sign pushed paths with.";
    };
  };

  # Every key of the builder's TOML config, typed: a typo in an option name is an eval error.
  settingsType = types.submodule {
    options = {
      nats = {
        url = mkOption { type = types.str; default = "nats://127.0.0.1:4222"; description = "NATS server URL(s), comma-separated."; };
        nkey_seed_file = optional types.str "File with the NKey user seed the builder authenticates with.";
      };
      builder = {
        name = mkOption { type = token; default = config.networking.hostName; description = "Builder name: shown in events, the fleet list and API subjects."; };
        state_dir = mkOption { type = types.str; default = "/var/lib/homelab-deploy"; description = "Git mirrors and GC roots."; };
        max_concurrent_requests = optional types.ints.positive "Requests built at once.";
        host_timeout_secs = optional types.ints.positive "Time limit of one host.";
        request_timeout_secs = optional types.ints.positive "Time limit of one request.";
        max_timeout_secs = optional types.ints.positive "Largest time limit a request may ask for.";
        build_jobs = optional types.ints.positive "Hosts of one request built at once.";
        eval_batch_size = optional types.ints.positive "Hosts evaluated together in one nix process.";
        eval_memory_limit_mb = optional types.ints.unsigned "Memory limit of a shared evaluation (0: none).";
        nix = optional types.str "The nix binary (default: nix on the service's PATH).";
      };
      streams = {
        events_max_age_secs = optional types.ints.positive "How long events and logs are kept.";
        events_max_bytes = optional types.ints.positive "How much of events and logs is kept.";
        max_pending_requests_per_target = optional types.ints.positive "Queued requests per repo and target.";
        max_pending_requests = optional types.ints.positive "Queued requests in all.";
        requests_max_bytes = optional types.ints.positive "Bytes of queued requests in all.";
        replicas = optional (types.ints.between 1 5) "Stream replicas (3 on a NATS cluster).";
        request_ack_wait_secs = optional types.ints.positive "Redelivery delay of a dead builder's request.";
      };
      repos = mkOption { type = types.attrsOf repoSettings; default = { }; description = "Repos served, by name."; };
      vault = optional (types.submodule {
        options = {
          address = mkOption { type = types.str; example = "https://vault.example.org:8200"; description = "Vault (or OpenBao) address."; };
          nkey_secret = mkOption { type = types.str; default = "shared/homelab-deploy/builder-nkey"; description = "mount/path of the secret holding the seed."; };
          nkey_field = optional types.str "Field of the secret holding the seed (default nkey_seed).";
          auth = mkOption { type = types.enum [ "approle" "token" ]; default = "approle"; description = "How the builder logs in to Vault."; };
          role_id_file = optional types.str "AppRole role id file.";
          secret_id_file = optional types.str "AppRole secret id file.";
          token_file = optional types.str "Vault token file (auth = token).";
          kv_version = optional (types.enum [ 1 2 ]) "KV version of the mount (default: asked from Vault).";
          approle_mount = optional types.str "Mount path of the AppRole auth method (default approle).";
          refresh_interval_secs = optional types.ints.positive "Fetch the seed again after this long (default 3600).";
        };
      }) "Fetch the NKey seed from Vault (absent: off).";
      metrics = optional (types.submodule {
        options = {
          enable = mkOption { type = types.bool; default = true; description = "Serve /metrics."; };
          listen = mkOption { type = types.str; default = "0.0.0.0:9973"; description = "Address of the /metrics endpoint."; };
        };
      }) "Prometheus metrics endpoint (absent: off).";
    };
  };

  dropNulls = lib.filterAttrsRecursive (_: value: value != null);
  # `nix copy --to file://DIR` writes DIR from inside the service: with ProtectSystem=strict it
  # must be listed as writable.
  pushDirs = lib.unique (lib.concatMap
    (repo:
      let uri = repo.push_to; in
      lib.optional (uri != null && lib.hasPrefix "file://" uri)
        (builtins.head (lib.splitString "?" (lib.removePrefix "file://" uri))))
    (lib.attrValues cfg.settings.repos));
  configFile = settingsFormat.generate "homelab-deploy-builder.toml" (dropNulls cfg.settings);
in
{
  options.services.homelab-deploy.builder = {
    enable = mkEnableOption "the homelab-deploy builder, which builds NixOS hosts of flake repos on request over NATS";

    package = mkOption {
      type = types.package;
      default = pkgs.homelab-deploy;
      defaultText = literalExpression "pkgs.homelab-deploy";
      description = "The homelab-deploy package.";
    };

    repos = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          url = mkOption { type = types.str; description = "Git URL with nix's `git+` prefix."; };
          ref = mkOption { type = types.str; default = "main"; description = "Branch built by default."; };
        };
      });
      default = { };
      example = literalExpression ''{ nixos-servers = { url = "git+https://git.example.org/torjus/nixos-servers.git"; ref = "master"; }; }'';
      description = "Repos to serve (shorthand for `settings.repos`). Names are `[A-Za-z0-9_-]{1,64}`.";
    };

    natsUrl = mkOption { type = types.str; default = "nats://127.0.0.1:4222"; description = "NATS server URL(s), comma-separated."; };

    nkeySeedFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/builder-nkey";
      description = "File with the builder's NKey user seed (readable by the `homelab-deploy` user).";
    };

    vault = {
      address = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://vault.example.org:8200";
        description = ''
          Vault (or OpenBao) address. When set, the builder fetches its NKey seed from Vault
          (AppRole login) instead of reading `nkeySeedFile`; see `settings.vault` for every
          setting and docs/configuration.md for the policy it needs.
        '';
      };
      nkeySecret = mkOption { type = types.str; default = "shared/homelab-deploy/builder-nkey"; description = "mount/path of the secret holding the seed in field `nkey_seed`."; };
      roleIdFile = mkOption { type = types.nullOr types.str; default = null; example = "/run/secrets/homelab-deploy/role-id"; description = "AppRole role id file (readable by the `homelab-deploy` user)."; };
      secretIdFile = mkOption { type = types.nullOr types.str; default = null; example = "/run/secrets/homelab-deploy/secret-id"; description = "AppRole secret id file (readable by the `homelab-deploy` user)."; };
    };

    metrics = {
      enable = mkEnableOption "the Prometheus metrics endpoint (job `homelab-deploy-builder`)";
      port = mkOption { type = types.port; default = 9973; description = "Port of /metrics."; };
      openFirewall = mkOption { type = types.bool; default = false; description = "Open the metrics port in the firewall."; };
    };

    drainTimeoutSec = mkOption {
      type = types.ints.positive;
      default = 7200;
      description = ''
        How long `systemctl stop` waits for the running build to finish (the builder drains on
        SIGTERM) before systemd kills it; its request then goes back to the queue.
      '';
    };

    settings = mkOption {
      type = settingsType;
      default = { };
      description = "The builder's config (docs/configuration.md), rendered to TOML.";
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      internal = true;
      description = "The rendered config file.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.all (name: builtins.match "[A-Za-z0-9_-]{1,64}" name != null && name != "api" && name != "responses") (lib.attrNames cfg.settings.repos);
        message = "services.homelab-deploy.builder: repo names must be [A-Za-z0-9_-]{1,64} and not `api` or `responses` (they become NATS subject tokens).";
      }
      {
        assertion = cfg.settings.vault == null || cfg.settings.nats.nkey_seed_file == null;
        message = "services.homelab-deploy.builder: set either nkeySeedFile or vault.address, not both (a seed file would win and Vault would never be asked).";
      }
      {
        assertion = cfg.settings.vault == null
          || (if cfg.settings.vault.auth == "approle"
              then cfg.settings.vault.role_id_file != null && cfg.settings.vault.secret_id_file != null
              else cfg.settings.vault.token_file != null);
        message = "services.homelab-deploy.builder: Vault AppRole login needs vault.roleIdFile and vault.secretIdFile (settings.vault.token_file with auth = \"token\").";
      }
      {
        assertion = cfg.settings.repos != { };
        message = "services.homelab-deploy.builder: no repos configured; set services.homelab-deploy.builder.repos.<name>.url.";
      }
    ];

    services.homelab-deploy.builder = {
      configFile = configFile;
      settings = {
        nats.url = mkDefault cfg.natsUrl;
        nats.nkey_seed_file = mkDefault cfg.nkeySeedFile;
        vault = mkIf (cfg.vault.address != null) {
          address = mkDefault cfg.vault.address;
          nkey_secret = mkDefault cfg.vault.nkeySecret;
          role_id_file = mkDefault cfg.vault.roleIdFile;
          secret_id_file = mkDefault cfg.vault.secretIdFile;
        };
        repos = lib.mapAttrs (_: repo: { url = mkDefault repo.url; ref = mkDefault repo.ref; }) cfg.repos;
        metrics = mkIf cfg.metrics.enable { listen = mkDefault "0.0.0.0:${toString cfg.metrics.port}"; };
      };
    };

    networking.firewall.allowedTCPPorts = lib.optional (cfg.metrics.enable && cfg.metrics.openFirewall) cfg.metrics.port;

    # Setting allowed-users here would replace NixOS' default "*" and lock other users out of
    # nix; instead, say so when a restrictive list leaves the builder out.
    warnings = lib.optional
      (!(lib.any (allowed: lib.elem allowed [ "*" "homelab-deploy" "@homelab-deploy" ]) config.nix.settings.allowed-users))
      "services.homelab-deploy.builder: nix.settings.allowed-users does not include the builder's user; add \"homelab-deploy\" to it, or nix-daemon refuses every build.";

    # A fixed user rather than DynamicUser: nix-daemon registers the builder's GC roots under
    # state_dir by path, and `nix.settings.allowed-users` names it; both need a stable identity.
    users.users.homelab-deploy = {
      isSystemUser = true;
      group = "homelab-deploy";
      home = cfg.settings.builder.state_dir;
      description = "homelab-deploy builder";
    };
    users.groups.homelab-deploy = { };

    systemd.services.homelab-deploy-builder = {
      description = "homelab-deploy builder";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "nix-daemon.socket" ];
      restartTriggers = [ configFile ];
      # nix builds through nix-daemon; nix itself runs git for git+file flakes.
      path = [ config.nix.package pkgs.git ];
      environment.NIX_REMOTE = "daemon";
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/homelab-deploy builder --config ${configFile}";
        User = "homelab-deploy";
        Group = "homelab-deploy";
        StateDirectory = "homelab-deploy";
        StateDirectoryMode = "0750";
        Restart = "on-failure";
        RestartSec = 5;
        # SIGTERM to the builder only: it drains, and stops its own nix process groups.
        KillMode = "mixed";
        TimeoutStopSec = cfg.drainTimeoutSec;
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictSUIDSGID = true;
        RestrictNamespaces = true;
        LockPersonality = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        CapabilityBoundingSet = "";
        ReadWritePaths = [ cfg.settings.builder.state_dir ] ++ pushDirs;
      };
    };
  };
}
