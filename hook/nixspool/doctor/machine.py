"""`nixspool doctor`, this machine: the post-build-hook in Nix's effective settings
and whether the running daemon has read it, the spool's owner and modes, the GC
roots directory, the user, and the key files' permissions. Secret keys are opened
only to read their name, and never shown.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from .. import gcroots, privileges, rootcode
from ..config import Config
from ..errors import NixspoolError
from ..hook import files
from ..setup import program
from ..spool import Owner, trusted_uids
from .check import Check


def _mode(path: str) -> str:
    return oct(stat.S_IMODE(os.stat(path).st_mode))[2:].rjust(4, "0")


def check_hook(settings: dict[str, str], daemon: tuple[int, float] | None = None) -> Check:
    """The hook in the settings nix.conf gives now, and whether the running daemon
    (pid, start time), which read nix.conf when it started, has read it since."""
    hook = settings.get("post-build-hook", "").strip()
    fix = (
        f"add `post-build-hook = {program('nixspool-hook')}` to /etc/nix/nix.conf and "
        "restart nix-daemon"
    )
    if not hook:
        return Check("nix.conf", False, "post-build-hook is not set", fix)
    if not os.path.basename(hook).startswith("nixspool-hook"):
        return Check("nix.conf", False, f"post-build-hook is {hook}, not nixspool-hook", fix)
    if not os.access(hook, os.X_OK):
        return Check("nix.conf", False, f"post-build-hook {hook} is not an executable", fix)
    unsafe = rootcode.hook_problems(hook)
    if unsafe:
        return Check(
            "nix.conf",
            False,
            f"post-build-hook {hook} runs as root, but {unsafe[0]}: whoever can change it "
            "runs code as root on the next build",
            "install nixspool as root, in a directory only root can write (e.g. "
            "/opt/nixspool), and point post-build-hook there",
        )
    conf = os.path.join(os.environ.get("NIX_CONF_DIR", "/etc/nix"), "nix.conf")
    try:
        changed = os.stat(conf).st_mtime
    except OSError:
        changed = 0.0
    # The start time is known to a second (the kernel gives the boot time in whole
    # seconds): a file written just before the daemon started is not "after".
    if daemon is not None and changed > daemon[1] + 2:
        return Check(
            "nix.conf",
            False,
            f"post-build-hook = {hook}, but {conf} changed after nix-daemon (pid {daemon[0]}) "
            "started: the daemon builds with the settings it read then",
            "restart nix-daemon (systemctl restart nix-daemon)",
        )
    return Check("nix.conf", True, f"post-build-hook = {hook}")


def running_daemon() -> tuple[int, float] | None:
    """The nix-daemon listening on this machine's daemon socket: (pid, start time).

    None when it cannot be told: no daemon runs yet (the next one reads nix.conf
    as it is now), or this user may not see root's processes.
    """
    socket_path = os.environ.get("NIX_DAEMON_SOCKET_PATH", "/nix/var/nix/daemon-socket/socket")
    try:
        with open("/proc/net/unix") as f:
            # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000: listening
            inodes = {
                fields[6]
                for fields in (line.split() for line in f)
                if len(fields) == 8 and fields[7] == socket_path and fields[3] == "00010000"
            }
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    sockets = {f"socket:[{inode}]" for inode in inodes}
    found: list[tuple[float, int]] = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "nix-daemon":  # systemd holds a socket unit's too
                    continue
            fds = os.listdir(f"/proc/{pid}/fd")
            if not any(os.readlink(f"/proc/{pid}/fd/{fd}") in sockets for fd in fds):
                continue
            with open(f"/proc/{pid}/stat") as f:
                # starttime, field 22; the fields after "comm)" begin at field 3
                started = int(f.read().rpartition(")")[2].split()[19]) / ticks
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        found.append((boot + started, int(pid)))
    if not found:
        return None
    started_at, listener = min(found)  # connections' workers came later
    return listener, started_at


def check_spool(cfg: Config) -> list[Check]:
    """The rule every command applies (files.why_spool_unsafe), not a stricter one."""
    directory = os.path.dirname(cfg.spool)
    try:
        owner = Owner.of_user(cfg.user) if cfg.user else None
    except NixspoolError:
        owner = None  # check_user says so, with the fix
    checks = []
    for path, kind in ((directory, "directory"), (cfg.spool, "file")):
        if not os.path.exists(path):
            checks.append(
                Check(
                    "spool",
                    False,
                    f"{path} does not exist",
                    "run `nixspool setup` (or any nixspool command as root)",
                )
            )
            return checks
        st = os.lstat(path)
        who = pwd.getpwuid(st.st_uid).pw_name if _known_uid(st.st_uid) else str(st.st_uid)
        reason = files.why_spool_unsafe(path, trusted_uids(owner))
        if reason is not None:
            checks.append(Check("spool", False, reason))
        else:
            checks.append(Check("spool", True, f"{kind} {path} is {who} {_mode(path)}"))
    return checks


def _known_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def check_user(cfg: Config) -> Check | None:
    if not cfg.user:
        return None
    try:
        account = privileges.account_of(cfg.user)
    except NixspoolError as e:
        return Check("user", False, str(e), f"useradd {cfg.user}, or fix 'user' in the config")
    try:
        nix_users = grp.getgrnam("nix-users").gr_gid
    except KeyError:
        return Check("user", True, f"{cfg.user} exists")
    if nix_users not in (account.gid, *account.groups):
        return Check(
            "user",
            False,
            f"{cfg.user} is not in group nix-users: nix copy cannot reach nix-daemon",
            f"usermod -a -G nix-users {cfg.user}",
        )
    return Check("user", True, f"{cfg.user} exists and may use nix-daemon")


def check_gc_roots(cfg: Config) -> Check | None:
    if not cfg.gc_roots or not cfg.user:
        return None
    directory = os.path.dirname(gcroots.roots_dir(cfg.spool))
    if not os.path.isdir(directory):
        return Check(
            "gc roots",
            False,
            f"{directory} does not exist",
            f"install -d -o {cfg.user} {directory}",
        )
    owner = pwd.getpwuid(os.stat(directory).st_uid).pw_name
    if owner not in (cfg.user, "root"):
        return Check(
            "gc roots", False, f"{directory} belongs to {owner}", f"chown {cfg.user} {directory}"
        )
    return Check("gc roots", True, f"{directory} keeps queued paths alive")


def signing_public_keys(settings: dict[str, str], cfg: Config) -> set[str]:
    """The public keys (NAME:base64) of the keys paths are signed with here: Nix's
    secret-key-files and the remotes' sign_key_file, derived from the secret ones."""
    from .. import sign

    files = settings.get("secret-key-files", "").split()
    files += [r.sign_key_file for r in cfg.remotes if r.sign_key_file]
    keys = set()
    for path in files:
        try:
            keys.add(sign.load_secret_key(path).public)
        except NixspoolError:
            continue  # check_key_files says what is wrong with it
    return keys


def check_key_files(cfg: Config) -> list[Check]:
    checks = []
    for remote in cfg.remotes:
        for label, path in (("ssh key", remote.ssh_key), ("signing key", remote.sign_key_file)):
            if not path:
                continue
            if not os.path.exists(path):
                checks.append(
                    Check(
                        label,
                        False,
                        f"{path} does not exist",
                        f"fix {label.replace(' ', '_')} of [remotes.{remote.name}]",
                    )
                )
            elif files.open_to_others(os.stat(path).st_mode):
                checks.append(
                    Check(
                        label,
                        False,
                        f"{path} is readable by group or others (mode {_mode(path)})",
                        f"chmod 0600 {path}",
                    )
                )
            else:
                checks.append(Check(label, True, f"{path} is private (mode {_mode(path)})"))
    return checks
