"""The Nix adapter: every question nixspool asks the local Nix, for each Nix it supports.

Nix's command line and JSON changed under nixspool's users (Nix 2.8 on Debian 12
up to 2.3x on NixOS, and Lix). This module is the one place that knows how:

- path info: `path-info --json` is a list (2.8-2.18, Lix, `"valid": false` for
  an invalid path), a map keyed by path since 2.19 (`null` for an invalid path),
  and with `--json-format 2` (2.33+, which warns without it) `{"info": {...}}`
  keyed by basename, references as basenames;
- a derivation's outputs: `show-derivation` (2.8-2.14), `derivation show` (2.15+),
  whose version 4 (2.33+) is `{"derivations": {...}}` with basenames;
- settings: `show-config`, `config show` since 2.20;
- does a store answer: `store ping`, `store info` since 2.19.
Lix forked at 2.18 and numbers its releases 2.90 and up: it gets the 2.18 forms.

The installed version is asked once per process (`nix --version`). Output that
fits none of the shapes above is a NixOutputError naming the command and the
version, never a traceback. Every store path in argv comes after `--`, and
every path read back from Nix is checked to be a store path before it is used.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import CommandError, NixOutputError
from .hook import storepath
from .hook.storepath import nix_base32, why_invalid
from .run import Account, Running, run, spawn

# `nix copy` and friends are behind the nix-command feature on 2.4 and later;
# naming it explicitly keeps nixspool independent of the user's nix.conf.
NIX = ("nix", "--extra-experimental-features", "nix-command")
# Keep each argv far below ARG_MAX (2 MiB), whatever the batch size.
ARGV_CHUNK = 2000

T = TypeVar("T")


@dataclass(frozen=True)
class NixVersion:
    """`nix --version`, parsed: which command names and JSON shapes to expect."""

    major: int
    minor: int
    patch: int
    lix: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> NixVersion:
        # "nix (Nix) 2.26.3", "nix (Lix, like Nix) 2.93.3", "nix (Nix) 2.34.0pre2026..."
        found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
        if found is None:
            raise NixOutputError(f"cannot read the Nix version from `nix --version`: {text!r}")
        major, minor, patch = (int(g or 0) for g in found.groups())
        return cls(major, minor, patch, "lix" in text.lower(), text.strip())

    def has(self, major: int, minor: int) -> bool:
        """Is this a CppNix of at least major.minor? Lix forked at 2.18 and numbers
        its releases 2.90 and up: it keeps the 2.18 command names."""
        return not self.lix and (self.major, self.minor) >= (major, minor)

    def __str__(self) -> str:
        return self.text


_asked: list[Running] = []  # ask_version()'s `nix --version`, running


def ask_version() -> None:
    """Start asking the local Nix's version now, for version() to read later (a
    flush asks while its probes log in)."""
    if not _asked and version.cache_info().currsize == 0:
        with contextlib.suppress(CommandError):  # version() asks again, and says why
            _asked.append(spawn(["nix", "--version"], timeout=30))


@functools.cache
def version() -> NixVersion:
    """The local Nix's version, asked once per process."""
    asked = _asked.pop().wait() if _asked else run(["nix", "--version"], timeout=30)
    return NixVersion.parse(asked.stdout)


def chunks(items: Sequence[str], size: int = ARGV_CHUNK) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- path info ---------------------------------------------------------------------


@dataclass(frozen=True)
class PathInfo:
    """What Nix knows of a valid store path, as signatures need it."""

    path: str
    nar_hash: str  # always `sha256:<nix-base32>`, the form a fingerprint takes
    nar_size: int
    references: tuple[str, ...]
    signatures: tuple[str, ...]
    deriver: str | None = None  # the .drv's full store path, when Nix knows it
    ca: str | None = None  # content address in narinfo form (`fixed:r:sha256:...`)


def closure(roots: Iterable[str], infos: Mapping[str, PathInfo]) -> set[str]:
    """The roots and everything they refer to, through `infos` (which must hold
    their closures: a --recursive path-info)."""
    found: set[str] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path not in found:
            found.add(path)
            todo.extend(infos[path].references)
    return found


def normalize_nar_hash(value: object) -> str:
    """`sha256:<nix-base32>` from any form Nix prints: SRI (`sha256-<base64>`),
    `sha256:<base16>`, `sha256:<nix-base32>`, or a structured hash object."""
    if isinstance(value, Mapping):  # {"algorithm": "sha256", "format": ..., "hash": ...}
        algorithm, fmt, digest = value.get("algorithm"), value.get("format"), value.get("hash")
        if algorithm == "sha256" and isinstance(digest, str):
            if fmt == "base64":
                return "sha256:" + nix_base32(base64.b64decode(digest))
            if fmt == "base16":
                return "sha256:" + nix_base32(bytes.fromhex(digest))
            if fmt in ("nix32", "base32"):
                return "sha256:" + digest
        raise ValueError(f"unknown hash object {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"unknown hash {value!r}")
    if value.startswith("sha256-"):
        return "sha256:" + nix_base32(base64.b64decode(value[len("sha256-") :], validate=True))
    algorithm, _, digest = value.partition(":")
    if algorithm != "sha256":
        raise ValueError(f"unknown hash {value!r}")
    if len(digest) == 64:
        return "sha256:" + nix_base32(bytes.fromhex(digest))
    if len(digest) == 52:
        return value
    raise ValueError(f"unknown hash {value!r}")


# A structured content address (--json-format 2) as a narinfo writes it.
_CA_PREFIXES = {"text": "text:", "nar": "fixed:r:", "flat": "fixed:"}


def normalize_ca(value: object) -> str | None:
    """The narinfo `CA:` form of a content address, None for an input-addressed
    path or a method narinfo files cannot state (git hashing)."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, Mapping) and value.get("method") in _CA_PREFIXES:
        return _CA_PREFIXES[value["method"]] + normalize_nar_hash(value.get("hash"))
    return None


def _signature(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("keyName"), str):
        return f"{value['keyName']}:{value['sig']}"  # the structured form (format 3)
    raise ValueError(f"unknown signature {value!r}")


def _full_path(name: str, store_dir: str) -> str:
    path = name if name.startswith("/") else f"{store_dir}/{name}"
    reason = why_invalid(path, store_dir)
    if reason is not None:
        raise ValueError(f"{name!r} {reason}")
    return path


def parse_path_infos(text: str, store_dir: str) -> dict[str, PathInfo]:
    """`nix path-info --json` output of any supported Nix, valid paths only.

    ValueError (or KeyError, TypeError) for a shape nixspool does not know.
    """
    data = json.loads(text)
    entries: Iterable[tuple[str, Any]]
    if isinstance(data, list):  # <= 2.18 and Lix: [{"path": ..., "valid": false}, ...]
        entries = [(item["path"], item) for item in data if item.get("valid", True)]
    elif isinstance(data, dict) and isinstance(data.get("info"), dict):  # --json-format 2
        store_dir = data.get("storeDir", store_dir)
        entries = data["info"].items()
    elif isinstance(data, dict):  # 2.19+: {path: info or null}, plus version/storeDir (2.33+)
        if isinstance(data.get("storeDir"), str):
            store_dir = data["storeDir"]
        entries = [(k, v) for k, v in data.items() if k not in ("version", "storeDir")]
    else:
        raise ValueError(f"a JSON {type(data).__name__}")
    infos: dict[str, PathInfo] = {}
    for name, item in entries:
        if item is None:  # not valid in that store
            continue
        path = _full_path(name, store_dir)
        infos[path] = PathInfo(
            path,
            normalize_nar_hash(item["narHash"]),
            int(item["narSize"]),
            tuple(_full_path(r, store_dir) for r in item.get("references") or ()),
            tuple(_signature(s) for s in item.get("signatures") or ()),
            _full_path(item["deriver"], store_dir) if item.get("deriver") else None,
            normalize_ca(item.get("ca")),
        )
    return infos


def path_infos(
    paths: Sequence[str],
    *,
    recursive: bool = False,
    store: str | None = None,
    env: Mapping[str, str] | None = None,
    account: Account | None = None,
    timeout: float = 120,
) -> dict[str, PathInfo]:
    """Hash, size, references and signatures of `paths` (and their closure, with
    `recursive`) in the local store, or in the store at URL `store`."""
    argv = _path_info(recursive, store)
    infos: dict[str, PathInfo] = {}
    for chunk in chunks(paths):
        result = run([*argv, "--", *chunk], env=env, account=account, timeout=timeout)
        infos.update(_parsed("path-info", parse_path_infos, result.stdout))
    return infos


def start_path_infos(paths: Sequence[str]) -> Callable[[], dict[str, PathInfo]]:
    """path_infos(paths) of the local store, started now: the function returned
    waits for the answer, and raises what path_infos() would."""
    argv = _path_info(recursive=False, store=None)
    running = [spawn([*argv, "--", *chunk], timeout=120) for chunk in chunks(paths)]

    def answer() -> dict[str, PathInfo]:
        infos: dict[str, PathInfo] = {}
        try:
            for each in running:
                infos.update(_parsed("path-info", parse_path_infos, each.wait().stdout))
        finally:
            for each in running:
                if each.proc.poll() is None:  # left unread by a failure
                    each.kill()
        return infos

    return answer


def _path_info(recursive: bool, store: str | None) -> list[str]:
    argv = [*NIX, "path-info", "--json"]
    if version().has(2, 33):  # without it 2.33+ warns that --json alone will be an error
        argv += ["--json-format", "2"]
    if recursive:
        argv.append("--recursive")
    if store:
        argv += ["--store", store]
    return argv


# -- derivations ---------------------------------------------------------------------


def parse_derivation_outputs(text: str, store_dir: str) -> dict[str, list[str]]:
    """{drv path: its output paths} from `nix derivation show`/`show-derivation`."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}")
    if isinstance(data.get("derivations"), dict):  # version 4 (2.33+): keyed by basename
        data = data["derivations"]
    outputs: dict[str, list[str]] = {}
    for name, drv in data.items():
        paths = [o["path"] for o in drv["outputs"].values() if o.get("path")]
        outputs[_full_path(name, store_dir)] = sorted(_full_path(p, store_dir) for p in paths)
    return outputs


def outputs_of_many(drv_paths: Sequence[str], timeout: float = 120) -> dict[str, list[str]]:
    """{drv: its outputs} in one call per chunk (rows recorded by DRV_PATH alone:
    Nix 2.8.0's empty OUT_PATHS, and `--check` builds on 2.30-2.32.2).

    CommandError if any of them is not valid: the caller then asks one by one.
    """
    show = ["derivation", "show"] if version().has(2, 15) else ["show-derivation"]
    argv = [*NIX, *show]
    outputs: dict[str, list[str]] = {}
    for chunk in chunks(drv_paths):
        result = run([*argv, "--", *chunk], timeout=timeout)
        outputs.update(_parsed(" ".join(show), parse_derivation_outputs, result.stdout))
    if set(outputs) != set(drv_paths):
        raise CommandError(f"{' '.join(show)} did not describe every derivation")
    return outputs


def outputs_of(drv_path: str, timeout: float = 60) -> list[str]:
    """The output paths of one derivation (the slow path, to find the broken one)."""
    return outputs_of_many([drv_path], timeout=timeout)[drv_path]


# -- the store -----------------------------------------------------------------------


def invalid_paths(paths: Sequence[str], timeout: float = 60) -> set[str]:
    """The paths that are not (or no longer) valid in the local store."""
    invalid: set[str] = set()
    for chunk in chunks(paths):
        result = run(
            ["nix-store", "--check-validity", "--print-invalid", "--", *chunk], timeout=timeout
        )
        invalid.update(result.stdout.split())
    return invalid


def start_copy(
    url: str,
    paths: Sequence[str],
    *,
    timeout: float,
    stall: float | None = None,
    env: Mapping[str, str] | None = None,
    account: Account | None = None,
) -> Running:
    """Start `nix copy --to url paths`: their closures too; what the remote has is
    skipped. With its log as JSON events, whose progress results (bytes copied) tell
    a copy that moves from one that has stalled: stopped after `stall` seconds of
    silence. Its stderr reads as Nix's plain messages (plain_log)."""
    argv = [*NIX, "copy", "--to", url, "--log-format", "internal-json", "--", *paths]
    return spawn(argv, timeout=timeout, stall=stall, decode=plain_log, env=env, account=account)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain_log(stderr: str) -> str:
    """Nix's `--log-format internal-json` stderr as text: each message as Nix would
    print it (colours stripped), progress events left out, other lines (ssh's own,
    which Nix passes through) as they were."""
    lines = []
    for line in stderr.splitlines():
        if not line.startswith("@nix "):
            lines.append(line)
            continue
        if '"msg"' not in line:  # not a message: one of a long copy's ~40 progress events per MB
            continue
        try:
            event = json.loads(line[len("@nix ") :])
        except ValueError:
            lines.append(line)
            continue
        if isinstance(event, dict) and event.get("action") == "msg":
            lines.append(_ANSI.sub("", str(event.get("msg", ""))))
    return "\n".join(lines) + ("\n" if lines else "")


def copy_sigs(
    substituter: str,
    paths: Sequence[str],
    *,
    store: str | None = None,
    env: Mapping[str, str] | None = None,
    account: Account | None = None,
    timeout: float = 300,
) -> None:
    """Add the signatures a (file://) binary cache has for `paths` to the local
    store, or to the store at URL `store`."""
    argv = [*NIX, "store", "copy-sigs", "--substituter", substituter]
    if store:
        argv += ["--store", store]
    for chunk in chunks(paths):
        run([*argv, "--", *chunk], env=env, account=account, timeout=timeout)


def store_info(
    url: str,
    *,
    env: Mapping[str, str] | None = None,
    account: Account | None = None,
    timeout: float,
) -> None:
    """Does a Nix answer at `url`? CommandError if not."""
    info = ["store", "info"] if version().has(2, 19) else ["store", "ping"]
    run([*NIX, *info, "--store", url], env=env, account=account, timeout=timeout)


def config_show_argv(current: bool) -> list[str]:
    """argv that prints Nix's effective settings, one `name = value` a line: the
    current command (2.20+), or the name Nix 2.8-2.19 and Lix know."""
    return [*NIX, *(["config", "show"] if current else ["show-config"])]


def parse_settings(text: str) -> dict[str, str]:
    """`nix config show` output as a dict."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            settings[name.strip()] = value.strip()
    return settings


def settings(timeout: float = 30) -> dict[str, str]:
    """The local Nix's effective settings, as the daemon's clients see them."""
    return parse_settings(run(config_show_argv(version().has(2, 20)), timeout=timeout).stdout)


def remote_settings(
    ssh: Sequence[str], *, account: Account, env: Mapping[str, str], timeout: float
) -> dict[str, str]:
    """The settings of the Nix at the end of `ssh` (an ssh command line up to `--`).
    Its version is not known: the current command first (no deprecation warning on
    2.20+), then the name Nix 2.8-2.19 and Lix know."""
    try:
        argv = [*ssh, *config_show_argv(current=True)]
        return parse_settings(run(argv, account=account, env=env, timeout=timeout).stdout)
    except CommandError as e:
        if "show" not in e.stderr and "config" not in e.stderr:
            raise  # not an unknown command: the remote's real answer
    argv = [*ssh, *config_show_argv(current=False)]
    return parse_settings(run(argv, account=account, env=env, timeout=timeout).stdout)


def _parsed(command: str, parse: Callable[[str, str], T], text: str) -> T:
    """parse(text, store dir), or an error that names the command and the Nix."""
    try:
        return parse(text, storepath.store_dir())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise NixOutputError(
            f"`nix {command}` of {version()} printed what nixspool cannot read ({e}); "
            "please report it with `nix --version`"
        ) from None
