{
  description = "exo: heterogeneous-GPU cluster runtime";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    flake-utils.url = "github:numtide/flake-utils";
  };

  outputs = { self, nixpkgs, flake-utils }:
    flake-utils.lib.eachDefaultSystem (system:
      let
        pkgs = import nixpkgs { inherit system; };
      in
      {
        # `nix develop`: Python 3.11 and uv; then `uv run exo` / `uv run pytest`.
        devShells.default = pkgs.mkShell {
          packages = [ pkgs.python311 pkgs.uv pkgs.ruff ];
          shellHook = ''
            export UV_PYTHON=${pkgs.python311}/bin/python3.11
          '';
        };

        # `nix fmt`: format the Python sources with ruff.
        formatter = pkgs.writeShellScriptBin "exo-fmt" ''
          exec ${pkgs.ruff}/bin/ruff format "$@"
        '';
      });
}
