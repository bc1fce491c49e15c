# services.nixspool: record every local build, upload when the cache host is there.
#
#   imports = [ nixspool.nixosModules.default ];   # or ./contrib/nixos/module.nix
#   services.nixspool = {
#     enable = true;
#     user = "alice";                               # owns the SSH key
#     remotes.pi.url = "ssh-ng://pi";
#     settings.connect_timeout = 5;                 # any key of nixspool's config
#   };
#
# The units, the dispatcher scripts and their hardening are not written here:
# they are read from the files nixspool ships (hook/nixspool/data), the same
# files `nixspool setup` installs on other distributions, so there is one source.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.nixspool;
  toml = pkgs.formats.toml { };
  data = ../../hook/nixspool/data;

  # The [section] of a systemd unit file as { Key = "value"; }: how the module
  # takes the shipped units' settings, hardening included.
  unitSection =
    file: section:
    let
      step =
        acc: raw:
        let
          line = lib.trim raw;
          pair = builtins.match "([A-Za-z][A-Za-z-]*)=(.*)" line;
        in
        if lib.hasPrefix "[" line then
          acc // { current = line; }
        else if acc.current == "[${section}]" && pair != null then
          acc // { values = acc.values // { ${builtins.elemAt pair 0} = builtins.elemAt pair 1; }; }
        else
          acc;
    in
    (builtins.foldl' step {
      current = "";
      values = { };
    } (lib.splitString "\n" (builtins.readFile file))).values;

  spoolDir = dirOf cfg.settings.spool;
  gcRootsDir = "/nix/var/nix/gcroots/nixspool";
  userHome = config.users.users.${cfg.user}.home or "/home/${cfg.user}";

  # Values nixspool does not accept are caught when the system is built, as
  # nix.conf's checkConfig does: by nixspool's own loader.
  configFile =
    pkgs.runCommand "nixspool-config.toml"
      {
        nativeBuildInputs = [ cfg.package ];
        unchecked = toml.generate "nixspool-config-unchecked.toml" cfg.settings;
      }
      ''
        nixspool --config "$unchecked" config >/dev/null
        cp "$unchecked" "$out"
      '';

  # As `nixspool setup` writes them: one name a line, single-quoted for sh.
  shellList =
    items: "'" + lib.concatMapStringsSep "\n" (builtins.replaceStrings [ "'" ] [ "'\\''" ]) items + "'";
  dispatcher = pkgs.writeScript "90-nixspool" (
    builtins.replaceStrings
      [ ''NIXSPOOL_INTERFACES=""'' ''NIXSPOOL_CONNECTIONS=""'' ''NIXSPOOL=""'' ''NIXSPOOL_NMCLI=""'' ]
      [
        (if cfg.networkmanager.interfaces == [ ] then ''NIXSPOOL_INTERFACES=""'' else "NIXSPOOL_INTERFACES=${shellList cfg.networkmanager.interfaces}")
        (if cfg.networkmanager.connections == [ ] then ''NIXSPOOL_CONNECTIONS=""'' else "NIXSPOOL_CONNECTIONS=${shellList cfg.networkmanager.connections}")
        "NIXSPOOL='${cfg.package}/bin/nixspool'"
        # NetworkManager-dispatcher's PATH has no nmcli: the metered check needs it.
        "NIXSPOOL_NMCLI='${config.networking.networkmanager.package}/bin/nmcli'"
      ]
      (builtins.readFile (data + "/90-nixspool"))
  );

  # Nix 2.35 added async-post-build-hook; Lix (pname "lix", versions 2.9x) has not.
  nixPackage = config.nix.package;
  hookSetting =
    if cfg.hookSetting != "auto" then
      cfg.hookSetting
    else if (nixPackage.pname or "") == "nix" && lib.versionAtLeast (lib.getVersion nixPackage) "2.35" then
      "async-post-build-hook"
    else
      "post-build-hook";

  service = unitSection (data + "/nixspool-flush.service") "Service";
  timer = unitSection (data + "/nixspool-flush.timer") "Timer";
  pathUnit = unitSection (data + "/nixspool-flush.path") "Path";
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
      description = "Stores to upload to; every remote gets every path. Shorthand for `settings.remotes`.";
      type = lib.types.attrsOf (
        lib.types.submodule {
          options = {
            url = lib.mkOption {
              type = lib.types.str;
              example = "ssh-ng://pi";
              description = "Any URL `nix copy --to` accepts, or sftp://[user@]host/dir: a static cache nixspool writes over SFTP (man nixspool: Static caches). Other keys (skip_signed_by, compression) go in settings.remotes.<name>.";
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

    hookSetting = lib.mkOption {
      type = lib.types.enum [
        "auto"
        "post-build-hook"
        "async-post-build-hook"
      ];
      default = "auto";
      description = ''
        Which nix.conf setting runs nixspool-hook. `auto`: `async-post-build-hook` on
        Nix 2.35 and later (the hook no longer holds the build loop, and several run
        at once), `post-build-hook` on older Nix and on Lix, which has no such setting.
      '';
    };

    extraPackages = lib.mkOption {
      type = lib.types.listOf lib.types.package;
      default = [ ];
      example = lib.literalExpression "[ pkgs.netcat-openbsd ]";
      description = ''
        More programs on the flush unit's PATH, for what the user's ssh_config runs
        (a ProxyCommand's nc, a certificate helper). Nix and OpenSSH are always
        there; nixspool, ssh and nix copy find programs on that PATH alone.
      '';
    };

    timerInterval = lib.mkOption {
      type = lib.types.str;
      default = timer.OnUnitInactiveSec;
      description = "How often to retry while rows remain queued (systemd time span).";
    };

    networkmanager = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = config.networking.networkmanager.enable;
        defaultText = lib.literalExpression "config.networking.networkmanager.enable";
        description = "Start a flush when NetworkManager brings a connection up.";
      };
      interfaces = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "wlan0" ];
        description = "Only these interfaces start a flush (default: any).";
      };
      connections = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "Home WiFi" ];
        description = "Only these NetworkManager connections start a flush (default: any).";
      };
    };

    networkdDispatcher.enable = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Start a flush when systemd-networkd makes a link routable (networkd-dispatcher).";
    };

    flushAfterBuild = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Start a flush soon after each recorded build (the .path unit); for machines that are usually online.";
    };

    settings = lib.mkOption {
      default = { };
      example = {
        connect_timeout = 5;
        remotes.nas.url = "ssh://nas";
      };
      description = ''
        nixspool's config (see man nixspool: Configuration), as TOML. The options above set their
        keys with `mkDefault`; anything here merges with them, remotes included.
      '';
      type = lib.types.submodule {
        freeformType = toml.type;
        options.spool = lib.mkOption {
          type = lib.types.str;
          default = "/var/lib/nixspool/spool.sqlite";
          description = "The spool file; its directory is created for the user and made writable for the flush.";
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    services.nixspool.settings = {
      user = lib.mkDefault cfg.user;
      remotes = lib.mapAttrs (
        _: remote:
        lib.mapAttrs (_: lib.mkDefault) (
          lib.filterAttrs (_: value: value != null) {
            inherit (remote) url;
            ssh_key = remote.sshKey;
            sign_key_file = if remote.signKeyFile != null then remote.signKeyFile else cfg.signKeyFile;
          }
        )
      ) cfg.remotes;
    };

    environment.systemPackages = [ cfg.package ];
    environment.etc."nixspool/config.toml".source = configFile;

    nix.settings.${hookSetting} = "${cfg.package}/bin/nixspool-hook";

    systemd.tmpfiles.rules = [
      "d ${spoolDir} 0700 ${cfg.user} - -"
      "d ${gcRootsDir} 0755 ${cfg.user} - -"
    ];

    systemd.services.nixspool-flush = {
      description = "Upload queued Nix build outputs (nixspool flush)";
      after = [
        "network-online.target"
        "nix-daemon.service"
      ];
      wants = [ "network-online.target" ];
      # The PATH nixspool and everything it starts (ssh, nix copy) find programs on.
      path = [
        config.nix.package
        pkgs.openssh
      ]
      ++ cfg.extraPackages;
      # A switch must not kill an upload in progress (it may run for hours).
      restartIfChanged = false;
      serviceConfig = service // {
        ExecStart = "${cfg.package}/bin/nixspool flush";
        # The spool's directory, the GC roots and the user's home (ssh writes
        # known_hosts there, nix copy its ~/.cache/nix): writable, the rest not.
        ReadWritePaths = [
          spoolDir
          gcRootsDir
          "-${userHome}"
        ]
        # Where the flush writes its Prometheus metrics, if the settings say.
        ++ lib.optional (cfg.settings ? metrics_file) (dirOf cfg.settings.metrics_file);
      };
    };

    systemd.timers.nixspool-flush = {
      wantedBy = [ "timers.target" ];
      timerConfig = timer // {
        OnUnitInactiveSec = cfg.timerInterval;
      };
    };

    systemd.paths.nixspool-flush = lib.mkIf cfg.flushAfterBuild {
      wantedBy = [ "paths.target" ];
      pathConfig = pathUnit // {
        PathModified = "${cfg.settings.spool}-wal";
      };
    };

    networking.networkmanager.dispatcherScripts = lib.mkIf cfg.networkmanager.enable [
      {
        source = dispatcher;
        type = "basic";
      }
    ];

    services.networkd-dispatcher = lib.mkIf cfg.networkdDispatcher.enable {
      enable = true;
      rules.nixspool = {
        onState = [ "routable" ];
        script = builtins.readFile (data + "/50-nixspool");
      };
    };

    assertions = [
      {
        assertion = cfg.settings.remotes or { } != { };
        message = "services.nixspool: name at least one remote (remotes.<name>.url or settings.remotes).";
      }
      {
        assertion = config.users.users ? ${cfg.user};
        message = "services.nixspool.user = \"${cfg.user}\" is not a user of this system (users.users).";
      }
    ];
  };
}
