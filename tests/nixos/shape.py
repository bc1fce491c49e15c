"""nixspool installed as a NixOS machine has it, without building nixpkgs.

    python tests/nixos/shape.py SHAPE_JSON NIXPKGS OUT

SHAPE_JSON is what `nix-instantiate --eval --strict --json tests/nixos/eval.nix
-A shape` printed: the store paths the module's units and hook name, the
package's postFixup, the inputs of nixpkgs' Python wrapper. NIXPKGS is that
nixpkgs' source. OUT gets a small store of directories standing for those
store paths:

  store/python3    a Python with its standard library alone, as nixpkgs' python3
  store/nixspool   the package: nixspool in a site-packages of its own, its
                   programs wrapped by nixpkgs' own wrap.sh and make-wrapper.sh,
                   the hook written by the package's own postFixup
  store/libraries  nixspool's libraries, in a site-packages of their own
  store/<name>     each other store path named (nix, openssh, coreutils, bash,
                   ...): links to that Debian package's programs, as they are
                   seen from inside the namespace tests/lab/nixos_shape.py runs
                   them in, where /usr/bin holds only env and sh (see REAL)

and shape.json, which says which store path is which directory and holds the
unit, hook and dispatcher with their store paths replaced by those directories.
Nothing here is a copy of nixpkgs' code: its scripts are read from NIXPKGS.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]
STORE_PATH = re.compile(r"/nix/store/[0-9a-z]{32}-([^/\s\"':;]+)")
# Where the namespace that runs the shape keeps the real /usr/bin and /usr/sbin
# once it has put a nearly empty one in their place (tests/lab/nixos_shape.py).
REAL = "/run/nixspool-nixos-shape"
# A nixpkgs package's programs, as the Debian packages that have them here.
DEBIAN_OF = {
    "nix": ["nix-bin"],
    "openssh": ["openssh-client"],
    "bash": ["bash"],
    "coreutils": ["coreutils"],
    "coreutils-full": ["coreutils"],
    "findutils": ["findutils"],
    "gnugrep": ["grep"],
    "gnused": ["sed"],
    "systemd": ["systemd"],
    "systemd-minimal": ["systemd"],
    "iproute2": ["iproute2"],
    "util-linux": ["util-linux", "bsdutils"],
    "networkmanager": ["network-manager"],
}


def pname(name: str) -> str:
    """`openssh` of `openssh-10.3p1`, `util-linux` of `util-linux-2.41-bin`."""
    found = re.match(r"(.+?)-\d", name)
    return found[1] if found else name


def programs_of(debian_package: str) -> list[Path]:
    """Its programs, if it is installed here (nothing else, NetworkManager, is)."""
    listed = subprocess.run(
        ["dpkg", "-L", debian_package], capture_output=True, text=True, check=False
    ).stdout.split()
    return [
        Path(p)
        for p in listed
        if Path(p).parent.as_posix() in ("/usr/bin", "/usr/sbin", "/bin", "/sbin")
    ]


class Store:
    """Directories standing for store paths, made as they are first named."""

    def __init__(self, out: Path, shape: dict[str, Any]) -> None:
        self.root = out / "store"
        self.paths: dict[str, Path] = {
            shape["package"]: self.root / "nixspool",
            shape["python"]["store"]: self.root / "python3",
        }

    def local(self, store_path: str) -> Path:
        if store_path not in self.paths:
            name = STORE_PATH.fullmatch(store_path)[1]  # type: ignore[index]
            here = self.root / name
            self.paths[store_path] = here
            (here / "bin").mkdir(parents=True, exist_ok=True)
            for debian in DEBIAN_OF.get(pname(name), []):
                for program in programs_of(debian):
                    real = f"{REAL}/usr-{'sbin' if 'sbin' in program.parent.name else 'bin'}"
                    link = here / "bin" / program.name
                    if not link.is_symlink():
                        link.symlink_to(f"{real}/{program.name}")
        return self.paths[store_path]

    def write(self, store_path: str, text: str) -> Path:
        """A store path that is one executable file (a writeScript): `text` in it."""
        here = self.root / STORE_PATH.fullmatch(store_path)[1]  # type: ignore[index]
        here.write_text(self.translate(text))
        here.chmod(0o755)
        self.paths[store_path] = here
        return here

    def translate(self, text: str) -> str:
        """`text` with each store path replaced by its directory here."""
        return STORE_PATH.sub(lambda m: str(self.local(m[0])), text)


def bare_python(where: Path) -> Path:
    """nixpkgs' python3: an interpreter that imports nothing but its standard
    library. A venv of copies, so that it runs where /usr/bin is hidden."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--copies", str(where)], check=True
    )
    python = where / "bin" / "python3"
    for module in ("nixspool", "paramiko"):
        alone = subprocess.run([python, "-I", "-c", f"import {module}"], capture_output=True)
        assert alone.returncode != 0, f"the bare interpreter imports {module}"
    return python


def install(python: Path, package: Path, libraries: Path, site: str) -> None:
    """As buildPythonApplication does: the package's programs in bin/, its code in
    a site-packages of its own, its libraries in another, nothing on the
    interpreter's own path."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
             "--disable-pip-version-check", "--prefix", str(prefix), f"{CHECKOUT}[s3]"],
            check=True,
        )  # fmt: skip
        (installed,) = prefix.glob("lib/python*/site-packages")
        (package / site).mkdir(parents=True)
        (libraries / site).mkdir(parents=True)
        for entry in installed.iterdir():
            own = entry.name == "nixspool" or entry.name.startswith("nixspool-")
            shutil.move(entry, (package if own else libraries) / site / entry.name)
        (package / "bin").mkdir()
        for program in ("nixspool", "nixspool-hook"):
            shutil.move(prefix / "bin" / program, package / "bin" / program)
        shutil.move(prefix / "share", package / "share")


def stdenv_search_path_helpers(nixpkgs: Path) -> str:
    """addToSearchPath and the function it calls, which wrap.sh needs, as stdenv's
    setup.sh defines them (the rest of setup.sh sets up a whole build)."""
    setup_sh = (nixpkgs / "pkgs/stdenv/generic/setup.sh").read_text()
    wanted = ("addToSearchPathWithCustomDelimiter() {", "addToSearchPath() {")
    found = [re.search(rf"^{re.escape(w)}\n.*?^}}\n", setup_sh, re.M | re.S) for w in wanted]
    assert all(found), "stdenv's setup.sh no longer defines addToSearchPath"
    return "".join(f[0] for f in found if f)


def wrap(shape: dict[str, Any], store: Store, nixpkgs: Path, site: str) -> None:
    """nixpkgs' wrapPythonPrograms over the package's bin/, from nixpkgs' own files:
    wrap.sh with wrap-python.nix's substitutions, make-wrapper.sh with its shell."""
    package = store.local(shape["package"])
    substitutions = {
        "@sitePackages@": site,
        "@executable@": store.translate(shape["python"]["interpreter"]),
        "@python@": str(store.local(shape["python"]["store"])),
        "@pythonHost@": str(store.local(shape["python"]["store"])),
        "@magicalSedExpression@": shape["magicalSedExpression"],
    }
    python_dir = nixpkgs / "pkgs/development/interpreters/python"
    wrap_sh = (python_dir / "wrap.sh").read_text()
    for key, value in substitutions.items():
        wrap_sh = wrap_sh.replace(key, value)
    bash = store.translate(shape["shell"])  # pkgs.runtimeShell, make-wrapper.sh's @shell@
    make_wrapper = (nixpkgs / "pkgs/build-support/setup-hooks/make-wrapper.sh").read_text()
    script = package.parent / "wrap-python.sh"
    script.write_text(
        'die() { echo "$*" >&2; exit 1; }\n'
        + stdenv_search_path_helpers(nixpkgs)
        + make_wrapper.replace("@shell@", bash)
        + wrap_sh
        # The package's own postFixup, as its build runs it: wrapPythonPrograms,
        # then the hook written as `#!python -IS`, without the wrapper.
        + 'out=$1\npythonPath=("$2")\n'
        + store.translate(shape["postFixup"])
    )
    subprocess.run(
        ["bash", "-e", str(script), str(package), str(store.root / "libraries")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    script.unlink()


def main() -> None:
    shape_json, nixpkgs, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    shape: dict[str, Any] = json.loads(shape_json.read_text())
    if out.exists():
        shutil.rmtree(out)
    store = Store(out, shape)
    python = bare_python(store.local(shape["python"]["store"]))
    # nixpkgs' names, whatever this Python's version: the layout is what matters.
    site = shape["python"]["sitePackages"]
    interpreter = Path(store.translate(shape["python"]["interpreter"]))
    if not interpreter.exists():
        interpreter.symlink_to(python.name)
    install(python, store.local(shape["package"]), store.root / "libraries", site)
    wrap(shape, store, nixpkgs, site)
    dispatcher = store.write(shape["dispatcher"]["path"], shape["dispatcher"]["text"])
    translated = {  # first: each store path they name gets its directory here
        "real": REAL,
        "python": str(python),
        "hook": store.translate(shape["hook"]),
        "service": store.translate(shape["service"]),
        "dispatcher": {
            "script": str(dispatcher),
            "environment": {
                k: store.translate(v) for k, v in shape["dispatcher"]["environment"].items()
            },
        },
    }
    store_map = {k: str(v) for k, v in store.paths.items()}
    (out / "shape.json").write_text(json.dumps({"store": store_map, **translated}, indent=2))
    print(f"tests/nixos/shape.py: nixspool as NixOS installs it, in {out}")


if __name__ == "__main__":
    main()
