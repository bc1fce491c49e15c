# services.nixspool: record every local build, upload when the cache host is there.
#
#   imports = [ ./contrib/nixos/module.nix ];
#   services.nixspool = {
#     enable = true;
#     user = "alice";                               # owns the SSH key
#     remotes.pi.url = "ssh-ng://pi";
#   };
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.nixspool;
  toml = pkgs.formats.toml { };

  remoteSettings = lib.mapAttrs (
    _: remote:
    lib.filterAttrs (_: value: value != null) {
      inherit (remote) url;
      ssh_key = remote.sshKey;
      sign_key_file = if remote.signKeyFile != null then remote.signKeyFile else cfg.signKeyFile;
    }
  ) cfg.remotes;

  configFile = toml.generate "nixspool.toml" (
    {
      spool = "/var/lib/nixspool/spool.sqlite";
      inherit (cfg) user;
      remotes = remoteSettings;
    }
    // cfg.settings
  );

  dispatcher = pkgs.writeShellScript "90-nixspool" ''
    case "$2" in
      up|vpn-up|dhcp4-change|dhcp6-change) ;;
      connectivity-change) [ "''${CONNECTIVITY_STATE:-}" = NONE ] && exit 0 ;;
      *) exit 0 ;;
    esac
    exec ${config.systemd.package}/bin/systemctl start --no-block nixspool-flush.service
  '';
in
{
  options.services.nixspool = {
    enable = lib.mkEnableOption "nixspool: spool Nix build outputs and upload them when a cache host can be reached";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The nixspool package.";
    };

    user = lib.mkOption {
      type = lib.types.str;
      example = "alice";
      description = "The user who owns the SSH key: ssh and nix copy run as this user.";
    };

    remotes = lib.mkOption {
      default = { };
      description = "Stores to upload to; every remote gets every path.";
      type = lib.types.attrsOf (
        lib.types.submodule {
          options = {
            url = lib.mkOption {
              type = lib.types.str;
              example = "ssh-ng://pi";
              description = "Any URL `nix copy --to` accepts.";
            };
            sshKey = lib.mkOption {
              type = lib.types.nullOr lib.types.str;
              default = null;
              description = "SSH private key (default: the user's agent and keys).";
            };
            signKeyFile = lib.mkOption {
              type = lib.types.nullOr lib.types.str;
              default = null;
              description = "Nix secret key to sign with for this remote (default: signKeyFile).";
            };
          };
        }
      );
    };

    signKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/etc/nixspool/cache.sec";
      description = "Nix secret key (`nixspool keygen`) to sign uploads with. Not in the store.";
    };

    timerInterval = lib.mkOption {
      type = lib.types.str;
      default = "10min";
      description = "How often to retry while rows remain queued (systemd time span).";
    };

    networkmanager.enable = lib.mkOption {
      type = lib.types.bool;
      default = config.networking.networkmanager.enable;
      defaultText = lib.literalExpression "config.networking.networkmanager.enable";
      description = "Start a flush when NetworkManager brings a connection up.";
    };

    settings = lib.mkOption {
      type = toml.type;
      default = { };
      example = {
        connect_timeout = 5;
      };
      description = "Other top-level settings of nixspool's config (see its README).";
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    environment.etc."nixspool/config.toml".source = configFile;

    nix.settings.post-build-hook = "${cfg.package}/bin/nixspool-hook";

    systemd.tmpfiles.rules = [
      "d /var/lib/nixspool 0700 ${cfg.user} - -"
      "d /nix/var/nix/gcroots/nixspool 0755 ${cfg.user} - -"
    ];

    systemd.services.nixspool-flush = {
      description = "Upload queued Nix build outputs (nixspool flush)";
      after = [
        "network-online.target"
        "nix-daemon.service"
      ];
      wants = [ "network-online.target" ];
      path = [
        config.nix.package
        pkgs.openssh
      ];
      environment.NIX_REMOTE = "daemon";
      serviceConfig = {
        Type = "oneshot";
        ExecStart = "${cfg.package}/bin/nixspool flush";
        SuccessExitStatus = 75;
        TimeoutStartSec = "6h";
        Nice = 19;
        CPUSchedulingPolicy = "idle";
        IOSchedulingClass = "idle";
        ProtectSystem = "strict";
        ReadWritePaths = [
          "/var/lib/nixspool"
          "/nix/var/nix/gcroots/nixspool"
        ];
        PrivateTmp = true;
        NoNewPrivileges = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        UMask = "0077";
      };
    };

    systemd.timers.nixspool-flush = {
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnBootSec = "2min";
        OnUnitInactiveSec = cfg.timerInterval;
        RandomizedDelaySec = "1min";
        Persistent = true;
      };
    };

    networking.networkmanager.dispatcherScripts = lib.mkIf cfg.networkmanager.enable [
      {
        source = dispatcher;
        type = "basic";
      }
    ];

    assertions = [
      {
        assertion = cfg.remotes != { };
        message = "services.nixspool.remotes must name at least one remote.";
      }
    ];
  };
}
