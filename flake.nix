{
  description = "nixspool: upload what Nix builds to a sometimes-offline binary cache, never making a build wait";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      forAllSystems = lib.genAttrs [
        "x86_64-linux"
        "aarch64-linux"
      ];
    in
    {
      overlays.default = final: _prev: {
        nixspool = final.callPackage ./contrib/nixos/package.nix { };
      };

      packages = forAllSystems (system: rec {
        nixspool = nixpkgs.legacyPackages.${system}.callPackage ./contrib/nixos/package.nix { };
        default = nixspool;
      });

      nixosModules.default =
        { pkgs, ... }:
        {
          imports = [ ./contrib/nixos/module.nix ];
          services.nixspool.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };

      checks = forAllSystems (system: {
        package = self.packages.${system}.default;
        # A whole NixOS system with the module: what `nixos-rebuild` would build.
        module =
          (lib.nixosSystem {
            modules = [
              self.nixosModules.default
              {
                nixpkgs.hostPlatform = system;
                boot.isContainer = true;
                system.stateVersion = "26.05";
                users.users.alice.isNormalUser = true;
                services.nixspool = {
                  enable = true;
                  user = "alice";
                  remotes.pi.url = "ssh-ng://pi";
                };
              }
            ];
          }).config.system.build.toplevel;
      });
    };
}
