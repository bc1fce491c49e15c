"""`nixspool setup`: make a machine ready in one idempotent step.

It writes the config, creates the spool and the GC roots directory for the
configured user, installs the systemd units and the NetworkManager
dispatcher script (not on NixOS, whose module does that), makes the hook
start its Python without /bin/sh in front (as root, in a root-only install), and
says which line to add to nix.conf; it never edits nix.conf itself. Every file is
written only if its content or mode differs, atomically (a hook reading the
config at that moment sees the old file or the new one, never half of it),
so running it twice changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass, field
from importlib import resources

import nixspool

from . import atomic, gcroots, rootcode
from . import config as config_mod
from .errors import UsageError
from .hook import locate
from .privileges import account_of
from .spool import Owner, Spool

UNITS = ("nixspool-flush.service", "nixspool-flush.timer", "nixspool-flush.path")
DISPATCHER = "etc/NetworkManager/dispatcher.d/90-nixspool"
NETWORKD_DISPATCHER = "etc/networkd-dispatcher/routable.d/50-nixspool"
UNIT_DIR = "etc/systemd/system"
DISPATCHER_CONFIG = "/etc/nixspool/config.toml"  # the file the dispatcher's template names


@dataclass(frozen=True)
class SetupRequest:
    config_path: str
    user: str
    remotes: tuple[tuple[str, str], ...]  # (name, url)
    spool: str | None = None
    ssh_key: str | None = None
    interfaces: tuple[str, ...] = ()  # NetworkManager: only these trigger a flush
    connections: tuple[str, ...] = ()
    root: str = "/"  # where etc/ lives; another directory for tests and images
    force: bool = False
    allow_unsafe_install: bool = False  # root runs an installation others can change


@dataclass
class SetupReport:
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def render_config(req: SetupRequest) -> str:
    lines = ["# Written by `nixspool setup`; see man nixspool: Configuration.\n"]
    # Always named: the default depends on who runs nixspool (root's, or the
    # user's own), and the user the config names must find this one too.
    spool = req.spool or locate.default_spool(os.environ)
    lines.append(f"spool = {json.dumps(spool)}\n")
    lines.append(f"user = {json.dumps(req.user)}\n")
    for name, url in req.remotes:
        # A bare TOML key unless it has a dot (which would make a nested table).
        key = name if "." not in name else json.dumps(name)
        lines.append(f"\n[remotes.{key}]\nurl = {json.dumps(url)}\n")
        if req.ssh_key:
            lines.append(f"ssh_key = {json.dumps(req.ssh_key)}\n")
    return "".join(lines)


def write_file(
    path: str, content: str, mode: int, report: SetupReport, uid: int = 0, gid: int = 0
) -> None:
    """Write atomically, and only if content, mode or owner differ."""
    try:
        st = os.stat(path)
        with open(path) as f:
            same = (
                f.read() == content
                and stat.S_IMODE(st.st_mode) == mode
                and (os.geteuid() != 0 or (st.st_uid, st.st_gid) == (uid, gid))
            )
    except FileNotFoundError:
        same = False
    if same:
        report.unchanged.append(path)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    atomic.write_file(path, content, mode, owner=(uid, gid) if os.geteuid() == 0 else None)
    report.changed.append(path)


def template(name: str) -> str:
    return (resources.files("nixspool") / "data" / name).read_text()


def program(name: str) -> str:
    """The installed program beside this interpreter (the venv's bin/)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else (shutil.which(name) or name)


def render_dispatcher(
    nixspool: str,
    interfaces: tuple[str, ...],
    connections: tuple[str, ...],
    config_path: str = DISPATCHER_CONFIG,
    nmcli: str = "",
) -> str:
    def quoted(items: tuple[str, ...]) -> str:
        return "'" + "\n".join(i.replace("'", "'\\''") for i in items) + "'" if items else '""'

    text = template("90-nixspool")
    text = text.replace('NIXSPOOL_INTERFACES=""', f"NIXSPOOL_INTERFACES={quoted(interfaces)}")
    text = text.replace('NIXSPOOL_CONNECTIONS=""', f"NIXSPOOL_CONNECTIONS={quoted(connections)}")
    if config_path != DISPATCHER_CONFIG:  # where it looks for flush_on_metered
        text = text.replace(
            f"NIXSPOOL_CONFIG_FILE={DISPATCHER_CONFIG}",
            f"NIXSPOOL_CONFIG_FILE={quoted((config_path,))}",
        )
    if nmcli:  # NixOS's module names it: its dispatcher's PATH has no nmcli
        text = text.replace('NIXSPOOL_NMCLI=""', f"NIXSPOOL_NMCLI={quoted((nmcli,))}")
    return text.replace('NIXSPOOL=""', f"NIXSPOOL={quoted((nixspool,))}")


def render_unit(name: str, nixspool: str, spool_dir: str, home: str) -> str:
    """A unit of hook/nixspool/data with this machine's program, spool and user."""
    text = template(name).replace("/opt/nixspool/bin/nixspool", nixspool)
    # The templates name the default spool directory, for the NixOS module too.
    text = text.replace(os.path.dirname(locate.ROOT_SPOOL), spool_dir)
    return text.replace(" -/home\n", f" -{home}\n")


def install(req: SetupRequest) -> SetupReport:
    """`nixspool setup`: what the request asks for, written only where it differs."""
    report = SetupReport()
    if os.path.exists(os.path.join(req.root, "etc/NIXOS")):
        # /etc there is the system's build: a config written here would be replaced
        # at the next switch, and units beside the module's would fight them.
        raise UsageError(
            "this is NixOS: nixspool is set up by its module, not by `nixspool setup`: "
            "services.nixspool in your configuration (see docs/nixos.md, or `man "
            "nixspool`, NIXOS); setup changed nothing"
        )
    # What the units, the dispatcher and the hook would run as root, checked before
    # anything is written: whoever can change it runs code as root on the next
    # build or network event.
    hook = program("nixspool-hook")
    unsafe = rootcode.installation_problems(hook, program("nixspool"))
    if unsafe and os.geteuid() == 0 and not req.allow_unsafe_install:
        more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
        raise UsageError(
            f"this installation is not root's alone: {unsafe[0]}{more}; the units, the "
            "dispatcher and the post-build-hook would run it as root, so whoever can "
            "change it could run code as root. Install nixspool as root where only root "
            "can write (python3 -m venv /opt/nixspool; /opt/nixspool/bin/pip install ...), "
            "or pass --allow-unsafe-install to accept that (see man nixspool: Ownership)"
        )
    account = account_of(req.user)
    if not req.remotes:
        raise UsageError("name at least one remote: --remote pi=ssh-ng://pi")
    # 1. The config, unless one with other content is there (never clobbered silently).
    # Checked by the loader every command uses before anything is written: setup
    # never leaves a config behind that the next command would refuse.
    content = render_config(req)
    config_mod.parse(content, req.config_path, environ={})
    if os.path.exists(req.config_path) and not req.force:
        with open(req.config_path) as f:
            if f.read() != content:
                raise UsageError(
                    f"{req.config_path} exists with other content; edit it, or "
                    "pass --force to replace it"
                )
    write_file(req.config_path, content, 0o644, report)
    cfg = config_mod.load(req.config_path, environ={})
    # 2. The spool, owned by the user (docs/security.md#ownership), and its GC roots.
    owner = Owner.of_user(req.user)
    before = _owner_of(cfg.spool)
    Spool.open(cfg.spool, owner, stray_journal=locate.stray_journal(os.environ)).close()
    same = before == _owner_of(cfg.spool) and before is not None
    (report.unchanged if same else report.changed).append(cfg.spool)
    roots = gcroots.base_dir()
    os.makedirs(roots, mode=0o755, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(roots, account.uid, account.gid)
    # 3. Triggers: systemd units and dispatcher scripts.
    root = req.root
    nixspool = program("nixspool")
    spool_dir = os.path.dirname(cfg.spool)
    for unit in UNITS:
        write_file(
            os.path.join(root, UNIT_DIR, unit),
            render_unit(unit, nixspool, spool_dir, account.home),
            0o644,
            report,
        )
    if os.path.isdir(os.path.join(root, "etc/NetworkManager")):
        write_file(
            os.path.join(root, DISPATCHER),
            render_dispatcher(
                nixspool, req.interfaces, req.connections, os.path.abspath(req.config_path)
            ),
            0o755,
            report,
        )
    else:
        report.notes.append(
            "NetworkManager is not installed: no dispatcher script (the timer, "
            "or networkd-dispatcher if present, starts the flush)"
        )
    if os.path.isdir(os.path.join(root, "etc/networkd-dispatcher")):
        write_file(os.path.join(root, NETWORKD_DISPATCHER), template("50-nixspool"), 0o755, report)
    if root == "/" and os.path.isdir("/run/systemd/system"):
        report.notes.append(
            "run: systemctl daemon-reload && systemctl enable --now nixspool-flush.timer"
        )
    else:
        report.notes.append(
            "systemd is not running here: start `nixspool flush` from cron "
            "or by hand; the dispatcher script starts it detached"
        )
    hook_line = f"post-build-hook = {hook}"
    if unsafe:
        more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
        report.notes.append(
            f"WARNING: nix-daemon runs nixspool-hook as root, but {unsafe[0]}{more}: "
            "whoever can change it runs code as root on every build; install nixspool "
            "as root, in a directory only root can write (see man nixspool: Ownership)"
        )
    # Only the hook of the installation running this (program() may have found
    # another on PATH, whose package is not this one).
    this_install = os.path.dirname(hook) == os.path.dirname(sys.executable)
    if root == "/" and os.geteuid() == 0 and not unsafe and this_install:
        start_hook_directly(hook, report)
    if _has_line(os.path.join(root, "etc/nix/nix.conf"), hook_line):
        report.notes.append(
            f"/etc/nix/nix.conf has `{hook_line}` (`nixspool doctor` checks the daemon)"
        )
    else:
        report.notes.append(f"add to /etc/nix/nix.conf, then restart nix-daemon:\n    {hook_line}")
    return report


# The first line of the hook as pip installs it (hook/bin/nixspool-hook): /bin/sh,
# which re-executes the file with the python3 beside it. pip cannot give a script
# `#!…/python3 -IS` itself: it rewrites a script's `#!python` line to the bare
# interpreter, dropping the options.
SH_LAUNCHER = "#!/bin/sh\n"
SHEBANG_MAX = 255  # bytes the kernel reads of a #! line (BINPRM_BUF_SIZE - 1, Linux 5.1+)


def _python_beside(hook: str) -> str:
    """The interpreter pip's launcher re-executes the hook with."""
    return os.path.join(os.path.dirname(hook), "python3")


def direct_hook(hook: str) -> str | None:
    """The hook as the NixOS package builds it: `#!<the python3 beside it> -IS` and
    nixspool's own directory on sys.path, with no /bin/sh in front (1.6 to 3.2 ms
    less on every build: docs/performance.md). None when the interpreter's path
    cannot be a #! line (whitespace, or too long), which leaves the launcher."""
    python = _python_beside(hook)
    shebang = f"#!{python} -IS"
    if any(c.isspace() for c in python) or len(os.fsencode(shebang)) > SHEBANG_MAX:
        return None
    packages = os.path.dirname(os.path.dirname(nixspool.__file__))
    return (
        f"{shebang}\n"
        "# nixspool-hook, as `nixspool setup` leaves it: the interpreter is named above,\n"
        "# in isolated mode without site, so no /bin/sh has to find it on every build.\n"
        "# pip's own copy (a /bin/sh launcher) comes back with every reinstall and\n"
        "# works the same; `nixspool setup` makes it this again.\n"
        "import sys\n"
        f"sys.path.append({packages!r})\n"
        "from nixspool.hook.main import launch\n"
        "launch()\n"
    )


def start_hook_directly(hook: str, report: SetupReport) -> None:
    """Replace pip's /bin/sh launcher at `hook` with direct_hook(), in place: the
    nix.conf line stays the same, and a reinstall brings back a launcher that works.
    Only a regular file that is the launcher or already this (never through a
    link), only as root in an installation only root can change
    (rootcode.hook_problems: checked)."""
    content = direct_hook(hook)
    if content is None or not os.path.exists(_python_beside(hook)):
        return
    try:
        st = os.lstat(hook)
        with open(hook, "rb") as f:
            first = f.readline().decode(errors="replace")
    except OSError:
        return
    already = content.partition("\n")[0] + "\n"
    if stat.S_ISREG(st.st_mode) and first in (SH_LAUNCHER, already):
        write_file(hook, content, 0o755, report)


def _owner_of(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_uid, st.st_gid


def _has_line(path: str, line: str) -> bool:
    try:
        with open(path) as f:
            return any(" ".join(text.split()) == line for text in f)
    except OSError:
        return False
