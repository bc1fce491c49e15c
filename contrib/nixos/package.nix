# nixspool as a Nix package: `pkgs.callPackage ./package.nix { }`.
{
  lib,
  python3Packages,
}:

let
  pyproject = lib.importTOML ../../pyproject.toml;
  python = python3Packages.python;
  # What the build reads, nothing else: tests/, .ci/ and contrib/ do not change
  # the package's hash.
  sourceFiles = lib.fileset.unions [
    ../../pyproject.toml
    ../../README.md
    ../../hook
  ];
in
python3Packages.buildPythonApplication {
  pname = pyproject.project.name;
  version = pyproject.project.version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../..;
    fileset = sourceFiles;
  };
  passthru.sourceFiles = map toString (lib.fileset.toList sourceFiles);

  build-system = [ python3Packages.setuptools ];

  dependencies = with python3Packages; [
    typer
    sqlite-utils
    paramiko
    pynacl
    tenacity
    rich
  ];

  # The installed hook is a sh preamble that finds the venv's python; here the
  # interpreter is known at build time, so the hook starts it directly with
  # -IS (no site: it is on every build's critical path) and needs nothing
  # but nixspool's own package, which uses only the standard library.
  postFixup = ''
    rm -f $out/bin/.nixspool-hook-wrapped
    cat > $out/bin/nixspool-hook <<HOOK
    #!${python.interpreter} -IS
    import sys
    sys.path.append("$out/${python.sitePackages}")
    from nixspool.hook.main import launch
    launch()
    HOOK
    chmod 0755 $out/bin/nixspool-hook
  '';

  pythonImportsCheck = [
    "nixspool.cli"
    "nixspool.hook.main"
  ];

  # The test suite needs root, a nix-daemon, sshd and network namespaces.
  doCheck = false;

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.mit;
    mainProgram = "nixspool";
    platforms = lib.platforms.linux;
  };
}
