# The systemd sandbox the homelab-deploy units share, written once (imported by the modules,
# not a module itself).
rec {
  # Every unit: gains no privileges, sees the system read-only, no home directories, its own /tmp.
  basic = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
  };

  # A long-running service that only talks over the network (the builder, the dashboard): also
  # no devices, no kernel, clock, hostname or cgroup changes, no capabilities, only IP and Unix
  # sockets.
  service = basic // {
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
  };
}
