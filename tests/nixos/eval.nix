# Evaluate nixspool's flake and NixOS module against a pinned nixpkgs, without
# building anything (nothing can be downloaded in the test lab):
#
#   nix-instantiate --eval --strict --json tests/nixos/eval.nix --arg nixpkgs /path/to/nixpkgs
#
# prints, for each configuration below, what the module made of it: the config
# (as JSON), the rendered units, tmpfiles rules, dispatcher scripts, failed
# assertions, and for some the whole system's derivation. tests/lab/test_nixos.py
# checks it.
{ nixpkgs }:
let
  # The flakes evaluated by hand, as `nix flake` would: each `outputs` gets its
  # inputs, nixpkgs the pinned tree.
  nixpkgsFlake = (import (nixpkgs + "/flake.nix")).outputs {
    self = nixpkgsFlake // {
      outPath = nixpkgs;
    };
  };
  flake = (import ../../flake.nix).outputs {
    self = flake // {
      outPath = ../..;
    };
    nixpkgs = nixpkgsFlake;
  };
  inherit (nixpkgsFlake) lib;
  system = "x86_64-linux";

  nixosSystem =
    module:
    lib.nixosSystem {
      modules = [
        flake.nixosModules.default
        {
          nixpkgs.hostPlatform = system;
          boot.isContainer = true;
          system.stateVersion = "26.05";
          users.users.alice.isNormalUser = true;
        }
        module
      ];
    };
  evaluate = module: (nixosSystem module).config;

  report =
    {
      module,
      toplevel ? false,
    }:
    let
      config = evaluate module;
      units = config.systemd.units;
      text = name: if units ? ${name} then units.${name}.text else null;
      failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
    in
    {
      settings = config.services.nixspool.settings;
      service = text "nixspool-flush.service";
      timer = text "nixspool-flush.timer";
      path = text "nixspool-flush.path";
      tmpfiles = builtins.filter (lib.hasInfix " alice ") config.systemd.tmpfiles.rules;
      postBuildHook = config.nix.settings.post-build-hook or null;
      asyncPostBuildHook = config.nix.settings.async-post-build-hook or null;
      dispatchers = map (s: s.source.text) (config.networking.networkmanager.dispatcherScripts or [ ]);
      networkd = lib.mapAttrs (_: r: r.script) (config.services.networkd-dispatcher.rules or { });
      failedAssertions = failed;
      toplevel = if toplevel && failed == [ ] then config.system.build.toplevel.drvPath else null;
    };
  onNix =
    pname: version: extra:
    report {
      module =
        { pkgs, ... }:
        {
          nix.package = pkgs.runCommand "${pname}-${version}" { inherit pname version; } "mkdir $out";
          services.nixspool = {
            enable = true;
            user = "alice";
            remotes.pi.url = "ssh-ng://pi";
          }
          // extra;
        };
    };

  # What a NixOS machine with the module runs, for tests/lab/nixos_shape.py to
  # imitate without building nixpkgs (`-A shape` evaluates this alone, in seconds):
  # the package's store path, the inputs of nixpkgs' Python wrapper, the hook's
  # postFixup, the flush unit and NetworkManager's dispatcher as rendered.
  shape =
    let
      machine = nixosSystem {
        networking.networkmanager.enable = true;
        services.nixspool = {
          enable = true;
          user = "alice";
          remotes.pi.url = "ssh-ng://pi";
        };
      };
      inherit (machine) config pkgs;
      package = config.services.nixspool.package;
      python = pkgs.python3Packages.python;
      # wrap-python.nix's substitutions, taken from nixpkgs' own file: the sed
      # expression that puts site.addsitedir(...) into each wrapped script.
      wrapPython =
        (import (nixpkgs + "/pkgs/development/interpreters/python/wrap-python.nix") {
          inherit lib python;
          makePythonHook = hook: _script: hook;
          makeWrapper = null;
        }).substitutions;
      dispatcher = builtins.head config.networking.networkmanager.dispatcherScripts;
    in
    {
      package = package.outPath;
      postFixup = package.postFixup;
      python = {
        store = python.outPath; # not `outPath`: that would make the set a string
        interpreter = python.interpreter;
        sitePackages = python.sitePackages;
      };
      magicalSedExpression = wrapPython.magicalSedExpression;
      shell = pkgs.runtimeShell;
      hook = config.nix.settings.post-build-hook;
      service = config.systemd.units."nixspool-flush.service".text;
      dispatcher = {
        path = "${dispatcher.source}";
        text = dispatcher.source.text;
        environment = config.systemd.services.NetworkManager-dispatcher.environment;
      };
    };
in
{
  inherit shape;

  flake = {
    package = flake.packages.${system}.default.drvPath;
    overlay = (import nixpkgs { inherit system; overlays = [ flake.overlays.default ]; }).nixspool.drvPath;
    importsCheck = flake.packages.${system}.default.pythonImportsCheck or [ ];
    checkPaths = flake.packages.${system}.default.enabledTestPaths or [ ];
    sourceFiles = flake.packages.${system}.default.sourceFiles;
    check = flake.checks.${system}.module.drvPath;
  };

  minimal = report {
    module.services.nixspool = {
      enable = true;
      user = "alice";
      remotes.pi.url = "ssh-ng://pi";
    };
  };

  # NetworkManager, signing, two remotes, interface and connection filters.
  laptop = report {
    toplevel = true;
    module = {
      networking.networkmanager.enable = true;
      services.nixspool = {
        enable = true;
        user = "alice";
        signKeyFile = "/etc/nixspool/cache.sec";
        remotes.pi.url = "ssh-ng://pi";
        remotes.nas = {
          url = "ssh://nas";
          sshKey = "/home/alice/.ssh/id_nas";
        };
        networkmanager.interfaces = [ "wlan0" ];
        networkmanager.connections = [ "Home's WiFi" ];
      };
    };
  };

  # settings merge with the options: remotes added and extended, the spool moved.
  merged = report {
    module.services.nixspool = {
      enable = true;
      user = "alice";
      remotes.pi.url = "ssh-ng://pi";
      settings = {
        spool = "/srv/spool/nixspool.sqlite";
        connect_timeout = 5;
        remotes.pi.batch_size = 100;
        remotes.pi.exclude = [ "*-source" ];
        remotes.cache.url = "file:///srv/cache";
        metrics_file = "/var/lib/prometheus/node-exporter/nixspool.prom";
      };
    };
  };

  # No NetworkManager; networkd-dispatcher and the .path unit instead.
  server = report {
    module =
      { pkgs, ... }:
      {
        services.nixspool = {
          enable = true;
          user = "alice";
          remotes.pi.url = "ssh-ng://pi";
          networkdDispatcher.enable = true;
          flushAfterBuild = true;
          timerInterval = "30min";
          extraPackages = [ pkgs.netcat-openbsd ]; # a ProxyCommand's nc
        };
      };
  };

  # Which nix.conf setting runs the hook, by the Nix it is: Nix 2.35 has
  # async-post-build-hook, Lix has not. (Stand-ins: only pname and version are read.)
  nix235 = onNix "nix" "2.35.0" { };
  lix = onNix "lix" "2.94.0" { };
  nix235Blocking = onNix "nix" "2.35.0" { hookSetting = "post-build-hook"; };

  noSuchUser = report {
    module.services.nixspool = {
      enable = true;
      user = "bob";
      remotes.pi.url = "ssh-ng://pi";
    };
  };
}
