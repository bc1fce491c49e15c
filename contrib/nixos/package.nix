# nixspool as a Nix package: `pkgs.callPackage ./package.nix { }`.
{
  lib,
  python3Packages,
  installShellFiles,
}:

let
  pyproject = lib.importTOML ../../pyproject.toml;
  python = python3Packages.python;
  # What the build and its check phase read, nothing else: the lab tier, the
  # manual's pages, .ci/ and contrib/ do not change the package's hash (the
  # benchmark figures live in docs/performance.md, not in the package's readme).
  sourceFiles = lib.fileset.unions [
    ../../pyproject.toml
    ../../README.md
    ../../LICENSE
    ../../hook
    ../../docs/man/nixspool.1
    ../../docs/man/nixspool-hook.8
    ../../tests/conftest.py
    ../../tests/programs.py
    ../../tests/unit
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
  nativeBuildInputs = [ installShellFiles ];

  # The wheel carries the man pages as data files (share/man); should an installer
  # leave them out, install them from the source.
  postInstall = ''
    if [ ! -e $out/share/man/man1/nixspool.1 ]; then
      installManPage docs/man/nixspool.1 docs/man/nixspool-hook.8
    fi
  '';

  dependencies = with python3Packages; [
    typer
    sqlite-utils
    paramiko
    pynacl
    tenacity
    rich
    zstandard
    # The s3 extra (s3:// caches): part of the package, so a NixOS module's
    # s3:// remote works without a second install.
    boto3
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

  # The fast tier (tests/unit): pure logic, as the build user, no Nix, no network.
  # The lab tier needs root, a nix-daemon, sshd and network namespaces: tests/run.
  # test_docs.py checks the repository's documentation, which is not in the source.
  nativeCheckInputs = with python3Packages; [
    pytestCheckHook
    platformdirs
    hypothesis
  ];
  enabledTestPaths = [ "tests/unit" ];
  disabledTestPaths = [ "tests/unit/test_docs.py" ];
  preCheck = ''
    export HOME=$TMPDIR
    export PATH=$out/bin:$PATH
  '';

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.mit;
    mainProgram = "nixspool";
    platforms = lib.platforms.linux;
  };
}
