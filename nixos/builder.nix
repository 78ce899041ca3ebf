# services.homelab-deploy.builder: the builder daemon as a hardened systemd service.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf mkDefault types literalExpression;
  cfg = config.services.homelab-deploy.builder;
  hardening = import ./hardening.nix;
  ephemeral = cfg.session.maxBuilds != null || cfg.session.idleExit != null || cfg.session.lifetime != null;
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
      push_to = optional types.str ''
        Nix store URI of a binary cache each built host is copied to (`file://`, `s3://`,
        `ssh-ng://`, `https://`). `s3://` reads its credentials from the environment
        (`environmentFiles`: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, or `AWS_PROFILE` with
        `AWS_SHARED_CREDENTIALS_FILE`); `ssh-ng://` runs `ssh` (in the service's path) and takes
        its key as `?ssh-key=` (e.g. a credential, /run/credentials/homelab-deploy-builder.service/NAME).
        Credentials in the URI are never shown.
      '';
      push_secret_key_file = optional types.str "Key to sign pushed paths with (passed to the service with LoadCredential).";
      ssh_key_file = optional types.str "Private SSH (deploy) key for a `git+ssh://` url (passed with LoadCredential).";
      ssh_known_hosts_file = optional types.str "known_hosts file the `git+ssh://` server's host key is checked against (passed with LoadCredential).";
      token_file = optional types.str "File with an access token for a `git+https://` url, instead of one in the URL (passed with LoadCredential).";
      impure = optional types.bool "Evaluate the flake with --impure (it reads the clock or the environment).";
      nix_options = optional (types.attrsOf (types.oneOf [ types.str types.int types.bool (types.listOf types.str) ]))
        "Extra nix settings for this repo, each passed as --option KEY VALUE (never written to nix.conf).";
      expected_peak_mb = optional (types.attrsOf types.ints.positive)
        "Expected peak memory (MiB) of hosts, by host name: a floor under what the fleet measures, so a heavy host goes only to builders whose memory_mb fits it, from its first build on.";
    };
  };

  # Every key of the builder's TOML config, typed: a typo in an option name is an eval error.
  settingsType = types.submodule {
    options = {
      nats = {
        url = mkOption { type = types.str; default = "nats://127.0.0.1:4222"; description = "NATS server URL(s), comma-separated."; };
        nkey_seed_file = optional types.str "File with the NKey user seed the builder authenticates with (passed with LoadCredential).";
        inbox_prefix = optional (types.strMatching "[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+)*") "Prefix of the builder's reply subjects instead of `_INBOX`, e.g. `_INBOX_builder`: the one its NATS user may subscribe to (nats/prod.example.conf).";
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
        max_attempts = optional types.ints.positive "Times a request is started before it is given up (default 3).";
        closure_history = optional (types.ints.between 0 100) "Builds of each host kept as GC roots for closure diffs (default 5; 0: no diffs).";
        hosts_refresh_secs = optional types.ints.unsigned "Seconds between two listings of each repo's hosts at its branch head, for the fleet registry (default 300; 0: only at start and at builds).";
        memory_mb = optional types.ints.positive "Memory envelope (MiB): no request whose expected peak memory is larger starts here (default: the machine's MemTotal).";
        warm_affinity = optional types.bool "Hand a repeat build back (about 1 s at most) to an idle builder that holds the host's last build (default true).";
        lanes = optional (types.attrsOf types.ints.positive) "The fleet's lanes: name -> memory envelope (MiB) of the builders of that lane, the same on every builder. A request no live builder fits but a lane does waits (up to its timeout) for an autoscaled builder of that lane; homelab_deploy_lane_requests counts requests by lane.";
      };
      streams = {
        events_max_age_secs = optional types.ints.positive "How long events and logs are kept.";
        events_max_bytes = optional types.ints.positive "How much of events and logs is kept.";
        max_pending_requests_per_target = optional types.ints.positive "Queued requests per repo and target.";
        max_pending_requests = optional types.ints.positive "Queued requests in all.";
        requests_max_bytes = optional types.ints.positive "Bytes of queued requests in all.";
        replicas = optional (types.ints.between 1 5) "Stream replicas (3 on a NATS cluster).";
        request_ack_wait_secs = optional types.ints.positive "Redelivery delay of a dead builder's request.";
        events_duplicate_window_secs = optional types.ints.positive "Duplicate window of the events stream.";
        events_max_consumers = optional types.ints.positive "Most consumers the events stream holds at once (default 1000); the server refuses more.";
      };
      repos = mkOption { type = types.attrsOf repoSettings; default = { }; description = "Repos served, by name."; };
      tenants = mkOption {
        type = types.attrsOf (types.submodule {
          options = {
            nkey_seed_file = optional types.str "The builder's NKey seed in this tenant's NATS account (passed with LoadCredential).";
            creds_file = optional types.str "Or a .creds file for that user (passed with LoadCredential).";
            repos = mkOption { type = types.listOf token; description = "Repos (names of settings.repos) this tenant builds; each repo belongs to one tenant."; };
            priority = optional (types.ints.between 1 100) "Share of the build slots while several tenants wait (default 1).";
            max_queued = optional types.ints.positive "Requests the tenant's queue holds; one more is queue_full (default streams.max_pending_requests).";
          };
        });
        default = { };
        description = "Tenants, each in its own NATS account (docs/configuration.md, [tenants.NAME]); empty: one account, nats.nkey_seed_file.";
      };
      access = {
        require_signed = optional types.bool "Refuse unsigned build requests and cancels, and keys not in access.users (docs/configuration.md, [access]).";
        users = mkOption {
          type = types.attrsOf (types.submodule {
            options = {
              key = mkOption { type = types.str; description = "The user's NKey public key (U…), the one it connects and signs with."; };
              role = optional (types.enum [ "deployer" "admin" ]) "deployer (default): builds its repos, cancels its own builds; admin: anything.";
              repos = optional (types.listOf token) "Repos a deployer may build (default: every repo).";
            };
          });
          default = { };
          description = "Known users by name: who signed a request or cancel.";
        };
      };
      vault = optional (types.submodule {
        options = {
          address = mkOption { type = types.str; example = "https://vault.example.org:8200"; description = "Vault (or OpenBao) address."; };
          nkey_secret = mkOption { type = types.str; default = "shared/homelab-deploy/builder-nkey"; description = "mount/path of the secret holding the seed."; };
          nkey_field = optional types.str "Field of the secret holding the seed (default nkey_seed).";
          auth = mkOption { type = types.enum [ "approle" "token" ]; default = "approle"; description = "How the builder logs in to Vault."; };
          role_id_file = optional types.str "AppRole role id file (passed with LoadCredential).";
          secret_id_file = optional types.str "AppRole secret id file (passed with LoadCredential).";
          token_file = optional types.str "Vault token file, auth = token (passed with LoadCredential).";
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

  provisionCommand = credential: lib.escapeShellArgs ([
    "${cfg.package}/bin/homelab-deploy" "builder" "provision" "--config" "${configFile}"
  ] ++ credential ++ lib.optionals (cfg.provision.inboxPrefix != null) [ "--inbox-prefix" cfg.provision.inboxPrefix ]);

  # Every secret file reaches the service as a systemd credential (LoadCredential): systemd
  # reads it as root, wherever it is and whoever owns it, and hands the builder a private copy
  # under $CREDENTIALS_DIRECTORY, which the rendered config names instead.
  credentialsDir = "/run/credentials/homelab-deploy-builder.service";
  secretFile = id: path: { inherit id path; };
  secretFiles = lib.filter (file: lib.attrByPath file.path null cfg.settings != null) (
    [
      (secretFile "nkey-seed" [ "nats" "nkey_seed_file" ])
      (secretFile "vault-role-id" [ "vault" "role_id_file" ])
      (secretFile "vault-secret-id" [ "vault" "secret_id_file" ])
      (secretFile "vault-token" [ "vault" "token_file" ])
    ]
    ++ lib.concatMap
      (repo: [
        (secretFile "repo-${repo}-push-key" [ "repos" repo "push_secret_key_file" ])
        (secretFile "repo-${repo}-ssh-key" [ "repos" repo "ssh_key_file" ])
        (secretFile "repo-${repo}-known-hosts" [ "repos" repo "ssh_known_hosts_file" ])
        (secretFile "repo-${repo}-token" [ "repos" repo "token_file" ])
      ])
      (lib.attrNames cfg.settings.repos)
    ++ lib.concatMap
      (tenant: [
        (secretFile "tenant-${tenant}-nkey-seed" [ "tenants" tenant "nkey_seed_file" ])
        (secretFile "tenant-${tenant}-creds" [ "tenants" tenant "creds_file" ])
      ])
      (lib.attrNames cfg.settings.tenants)
  );
  loadCredentials = map (file: "${file.id}:${lib.getAttrFromPath file.path cfg.settings}") secretFiles;
  settingsWithCredentials = lib.foldl'
    (settings: file: lib.recursiveUpdate settings (lib.setAttrByPath file.path "${credentialsDir}/${file.id}"))
    cfg.settings
    secretFiles;
  # `nix copy --to file://DIR` writes DIR from inside the service: with ProtectSystem=strict it
  # must be listed as writable.
  pushDirs = lib.unique (lib.concatMap
    (repo:
      let uri = repo.push_to; in
      lib.optional (uri != null && lib.hasPrefix "file://" uri)
        (builtins.head (lib.splitString "?" (lib.removePrefix "file://" uri))))
    (lib.attrValues cfg.settings.repos));
  configFile = settingsFormat.generate "homelab-deploy-builder.toml" (dropNulls settingsWithCredentials);
in
{
  imports = [
    (lib.mkRemovedOptionModule [ "services" "homelab-deploy" "builder" "drainTimeoutSec" ] ''
      the builder no longer drains on stop: SIGTERM hands running requests back to the queue at
      once (see stopTimeoutSec). Drain with `homelab-deploy builder drain NAME` before a planned
      stop instead.
    '')
  ];

  options.services.homelab-deploy.builder = {
    enable = mkEnableOption "the homelab-deploy builder, which builds NixOS hosts of flake repos on request over NATS";

    package = lib.mkPackageOption pkgs "homelab-deploy" { };

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

    provision = {
      enable = mkEnableOption ''
        a oneshot unit, `homelab-deploy-builder-provision`, that runs `homelab-deploy builder
        provision` with an admin credential before the builder starts (and again when the config
        changes): on a NATS server where builders may not create streams (nats/prod.example.conf),
        it creates or updates the streams and buckets of this builder's repos and `[streams]`
        (with settings.tenants, in each tenant's account with provision.tenants.<name>)
      '';
      adminNkeySeedFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/homelab-deploy/admin.nk";
        description = "File with the NKey seed of a NATS user allowed to create and update the streams (passed with LoadCredential; the builder never sees it).";
      };
      inboxPrefix = mkOption {
        type = types.nullOr (types.strMatching "[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+)*");
        default = null;
        example = "_INBOX_admin";
        description = "The admin user's inbox prefix (`--inbox-prefix`), the same in every tenant's account.";
      };
      tenants = mkOption {
        type = types.attrsOf (types.submodule {
          options.adminNkeySeedFile = mkOption {
            type = types.str;
            example = "/run/secrets/homelab-deploy/alpha-admin.nk";
            description = "File with the NKey seed of the admin user in this tenant's NATS account (passed with LoadCredential; the builder never sees it).";
          };
        });
        default = { };
        description = ''
          With settings.tenants: the admin credential of each tenant's account, one per tenant
          (nats/multi-tenant.example.conf). The unit runs `builder provision --tenant NAME` for
          each; adminNkeySeedFile is then unused.
        '';
      };
    };

    stopTimeoutSec = mkOption {
      type = types.ints.positive;
      default = 30;
      description = ''
        How long `systemctl stop` or `restart` waits for the builder to exit. On SIGTERM it kills
        its running builds and hands their requests back to the queue (another builder, or this
        one once restarted, builds them again), which takes a few seconds; so a `nixos-rebuild
        switch` that changes the config never waits for a build. After this time systemd kills
        what is left (the requests then come back after the ack wait).
      '';
    };

    session = {
      maxBuilds = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = ''
          Make this an ephemeral builder that takes at most this many requests, finishes them
          and exits (`--max-builds`; 1 is `--once`). Any session option shows the builder as
          ephemeral in the registry and keeps its state in `state_dir/sessions/NAME`, removed at
          exit. The unit then counts exit 1 (a build it took failed) as success: pair it with a
          timer that starts it when the queue is deep (docs/operations.md).
        '';
      };
      idleExit = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10m";
        description = "Exit once no request has been running or taken for this long (`--idle-exit`).";
      };
      lifetime = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "2h";
        description = "Take requests for this long, then finish the running ones and exit (`--lifetime`).";
      };
    };

    environmentFiles = mkOption {
      # Strings, not paths: a path literal would copy the secrets into the world-readable store.
      type = types.listOf types.str;
      default = [ ];
      example = [ "/run/secrets/homelab-deploy/s3.env" ];
      description = ''
        systemd `EnvironmentFile`s of the service, for what a cache push needs from the environment:
        `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`
        (`s3://`), `NIX_SSHOPTS` (`ssh://`, `ssh-ng://`), proxy variables. These pass the builder's
        environment allowlist to `nix copy`; nothing else of the service's environment does.
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
        assertion = cfg.settings.tenants == { } || (cfg.settings.nats.nkey_seed_file == null && cfg.settings.vault == null);
        message = "services.homelab-deploy.builder: with settings.tenants, each tenant names the builder's credential in its account; leave nkeySeedFile and vault unset.";
      }
      {
        assertion = !cfg.provision.enable || cfg.settings.tenants != { } || cfg.provision.adminNkeySeedFile != null;
        message = "services.homelab-deploy.builder: provision.enable needs provision.adminNkeySeedFile (the seed of a NATS user allowed to create the streams).";
      }
      {
        assertion = !cfg.provision.enable || lib.attrNames cfg.provision.tenants == lib.attrNames cfg.settings.tenants;
        message = "services.homelab-deploy.builder: with settings.tenants, provision.enable needs provision.tenants.<name>.adminNkeySeedFile for each tenant and no other (tenants: ${toString (lib.attrNames cfg.settings.tenants)}; provision.tenants: ${toString (lib.attrNames cfg.provision.tenants)}).";
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

    # A credential is a copy made at start: when a secret file is replaced (a rotated seed, a
    # token that vault-agent renews), restart the builder so it reads the new one. The restart
    # hands running requests back and takes seconds.
    systemd.paths.homelab-deploy-builder-credentials = mkIf (secretFiles != [ ]) {
      description = "restart homelab-deploy-builder when one of its secret files changes";
      wantedBy = [ "multi-user.target" ];
      pathConfig.PathChanged = map (file: lib.getAttrFromPath file.path cfg.settings) secretFiles;
    };
    systemd.services.homelab-deploy-builder-credentials = mkIf (secretFiles != [ ]) {
      description = "restart homelab-deploy-builder for a changed secret file";
      serviceConfig = {
        Type = "oneshot";
        ExecStart = "${config.systemd.package}/bin/systemctl try-restart homelab-deploy-builder.service";
      };
    };

    networking.firewall.allowedTCPPorts = lib.optional (cfg.metrics.enable && cfg.metrics.openFirewall) cfg.metrics.port;

    # extra-allowed-users adds to allowed-users (NixOS' default "*", or a host's own list)
    # instead of replacing it: nix-daemon lets the builder build, and nobody else is locked out.
    nix.settings.extra-allowed-users = [ "homelab-deploy" ];

    # A fixed user rather than DynamicUser: nix-daemon registers the builder's GC roots under
    # state_dir by path, and `nix.settings.allowed-users` names it; both need a stable identity.
    users.users.homelab-deploy = {
      isSystemUser = true;
      group = "homelab-deploy";
      home = cfg.settings.builder.state_dir;
      description = "homelab-deploy builder";
    };
    users.groups.homelab-deploy = { };

    # The streams and buckets, created or updated with the admin's credential before the builder
    # starts; the builder's own key may not (docs/security.md). A failure is retried; the builder
    # meanwhile says which stream is missing.
    systemd.services.homelab-deploy-builder-provision = mkIf cfg.provision.enable {
      description = "homelab-deploy: provision the streams and buckets of the builder's config";
      wantedBy = [ "homelab-deploy-builder.service" ];
      before = [ "homelab-deploy-builder.service" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      restartTriggers = [ configFile ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        # One command per NATS account: the single one, or each tenant's with its own admin.
        ExecStart = if cfg.settings.tenants == { } then provisionCommand [ "--nkey-file" "%d/admin-nkey" ]
          else map (tenant: provisionCommand [ "--tenant" tenant "--nkey-file" "%d/admin-nkey-${tenant}" ]) (lib.attrNames cfg.provision.tenants);
        LoadCredential = if cfg.settings.tenants == { } then [ "admin-nkey:${toString cfg.provision.adminNkeySeedFile}" ]
          else lib.mapAttrsToList (tenant: t: "admin-nkey-${tenant}:${t.adminNkeySeedFile}") cfg.provision.tenants;
        Restart = "on-failure";
        RestartSec = 10;
        DynamicUser = true;
      } // hardening.basic;
    };

    systemd.services.homelab-deploy-builder = {
      description = "homelab-deploy builder";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      # Every build goes through nix-daemon: without its socket the builder can do nothing.
      requires = [ "nix-daemon.socket" ];
      after = [ "network-online.target" "nix-daemon.socket" ];
      # A changed config restarts the builder, which hands its running requests back to the queue
      # and is ready again in seconds: the builder cannot reload streams, consumers, repos and
      # credentials in place, and a drain could hold `nixos-rebuild switch` for hours.
      restartTriggers = [ configFile ];
      # nix builds through nix-daemon; nix itself runs git for git+file flakes; git fetches
      # git+ssh:// repos and nix pushes to ssh:// and ssh-ng:// caches with ssh.
      path = [ config.nix.package pkgs.git pkgs.openssh ];
      environment.NIX_REMOTE = "daemon";
      serviceConfig = {
        ExecStart = lib.concatStringsSep " " ([ "${cfg.package}/bin/homelab-deploy builder --config ${configFile}" ]
          ++ lib.optional (cfg.session.maxBuilds != null) "--max-builds ${toString cfg.session.maxBuilds}"
          ++ lib.optional (cfg.session.idleExit != null) "--idle-exit ${lib.escapeShellArg cfg.session.idleExit}"
          ++ lib.optional (cfg.session.lifetime != null) "--lifetime ${lib.escapeShellArg cfg.session.lifetime}");
        # A session builder's verdict (1: a build it took failed) is no unit failure.
        SuccessExitStatus = lib.mkIf ephemeral "1";
        # READY=1 once the streams and consumers are set up (units ordered after the builder
        # start then), STOPPING=1 when it stops.
        Type = "notify";
        NotifyAccess = "main";
        LoadCredential = loadCredentials;
        EnvironmentFile = cfg.environmentFiles;
        # The kernel killing a nix evaluation that ran out of memory must not stop the builder:
        # the host's build fails with that error and the builder goes on.
        OOMPolicy = "continue";
        User = "homelab-deploy";
        Group = "homelab-deploy";
        StateDirectory = "homelab-deploy";
        StateDirectoryMode = "0750";
        Restart = "on-failure";
        RestartSec = 5;
        # SIGTERM to the builder only: it stops its own nix process groups and hands the
        # requests back; SIGKILL reaches whatever is left after TimeoutStopSec.
        KillMode = "mixed";
        TimeoutStopSec = cfg.stopTimeoutSec;
        ReadWritePaths = [ cfg.settings.builder.state_dir ] ++ pushDirs;
      } // hardening.service;
    };
  };
}
