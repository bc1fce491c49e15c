"""`nixspool doctor`: is this machine set up right? One line per check, with the fix.

Checks, in the order a setup goes wrong: the config; the post-build-hook in
Nix's effective settings; the spool's owner and modes; the GC roots
directory; the user; then for each remote: how the user's ssh reaches it
(`ssh -G`), the SSH login as the user (the flusher's own probe: their ssh),
Nix on the remote, and whether the remote will accept uploads (a trusted
user there, or a signature by a key it trusts), and, if this machine
substitutes from it, with fallback and a connect-timeout; and the key files'
permissions. Secret keys are opened only to
read their name, and never shown.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import urllib.parse
from dataclasses import asdict, dataclass

from . import config as config_mod
from . import gcroots, nix, privileges
from .config import Config, Remote
from .errors import CommandError, NixspoolError
from .hook import files
from .outcome import Outcome, classify, unsupported_store
from .probe import (
    ProbeResult,
    SshCommand,
    Verdict,
    nix_ssh_env,
    resolve,
    start_probe,
    verdict,
)
from .run import Account, last_line
from .setup import program
from .spool import Owner, trusted_uids


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


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


def check_remote(remote: Remote, account: Account, our_keys: set[str]) -> list[Check]:
    name = f"remote {remote.name}"
    if not remote.uses_ssh:
        return [_ping(remote, account, name)]
    resolved = _resolution(remote, account, name)
    if not resolved.ok:
        return [resolved]
    result = _probe(remote, account)
    login = f"SSH login as {account.name}"
    if result.verdict is not Verdict.OK:
        what = "could not run ssh" if result.verdict is Verdict.ERROR else result.verdict.value
        return [
            resolved,
            Check(name, False, f"{login}: {what}: {result.message}", _probe_fix(result, account)),
        ]
    checks = [resolved, Check(name, True, login)]
    if remote.nixspool_writes:
        checks.append(_cache_directory(remote, account, name))
        return checks
    checks.append(_ping(remote, account, name))
    if checks[-1].ok:
        checks.append(_trust(remote, account, our_keys, name))
    return checks


def _resolution(remote: Remote, account: Account, name: str) -> Check:
    """How the user's OpenSSH reaches the remote (`ssh -G`), in one line."""
    try:
        found = resolve(remote, account)
    except CommandError as e:
        return Check(
            name,
            False,
            f"{account.name}'s ssh cannot read its config for this host: {e}",
            f"fix {account.name}'s ~/.ssh/config (or /etc/ssh/ssh_config); see `man nixspool`, SSH",
        )
    via = [f"{key} {found[key]}" for key in ("proxyjump", "proxycommand") if key in found]
    where = f"{found.get('user', '?')}@{found.get('hostname', '?')}:{found.get('port', '22')}"
    return Check(
        name, True, f"ssh reaches it as {where}" + (f" via {', '.join(via)}" if via else "")
    )


def _cache_directory(remote: Remote, account: Account, name: str) -> Check:
    """The directory of a cache nixspool writes (sftp://): there, and for this store."""
    from . import static_cache

    directory = static_cache.directory_of(remote.url)
    try:
        result = static_cache.read_cache(remote, account, accept_new_host_keys=False)
    except CommandError as e:
        return Check(name, False, f"reading {directory} failed: {e}", "see README#static-caches")
    if result.error is not None:
        return Check(
            name,
            False,
            f"cache directory {directory}: {result.error['message']}",
            f"create {directory} on the host, writable by the SSH login (see README#static-caches)",
        )
    return Check(
        name, True, f"cache directory {directory} is there ({result.narinfo_files} paths in it)"
    )


def _probe(remote: Remote, account: Account) -> ProbeResult:
    # Never accept a new host key from here: doctor reports, it changes nothing.
    return verdict(start_probe(remote, account, accept_new_host_keys=False))


def _probe_fix(result: ProbeResult, account: Account) -> str:
    """What to do, by the step of the login ssh failed at."""
    as_user = f"as {account.name}, `ssh -o BatchMode=yes HOST true` says the same"
    return {
        "resolve": f"check the host name in the url and in {account.name}'s ~/.ssh/config",
        "tcp": "is the host on and on this network? is sshd running there?",
        "banner": "is it sshd that listens there, and is the host (or its proxy) up?",
        "login": "the host stopped answering during the login; is it overloaded?",
        "proxy": f"check the ProxyJump/ProxyCommand in {account.name}'s ~/.ssh/config",
        "hostkey": f"as {account.name}, run `ssh HOST` once and check the host key",
        "auth": f"add {account.name}'s public key to ~/.ssh/authorized_keys on the host, "
        "or set ssh_key for this remote",
        "sftp": "enable the sftp subsystem in the host's sshd_config",
        "config": f"fix {account.name}'s ~/.ssh/config",
        "error": "install OpenSSH's client (ssh) on this machine",
    }.get(result.stage, as_user)


def _ping(remote: Remote, account: Account, name: str) -> Check:
    try:
        nix.store_info(
            remote.url,
            account=account,
            env=nix_ssh_env(remote, account, False),
            timeout=4 * remote.connect_timeout + 10,
        )
    except CommandError as e:
        if classify(e.stderr or str(e)) is Outcome.UNSUPPORTED:
            return Check(
                name,
                False,
                unsupported_store(remote.url, last_line(e.stderr or str(e))),
                "every flush will stop at this remote until its url or this Nix changes",
            )
        return Check(
            name,
            False,
            f"Nix on the remote: {e}",
            "install Nix on the remote, on the remote user's PATH",
        )
    return Check(name, True, "Nix answers on the remote")


def _trust(remote: Remote, account: Account, our_keys: set[str], name: str) -> Check:
    """Will the remote accept our uploads? Ask its own Nix, over ssh, as the user."""
    if remote.url.startswith("ssh://"):
        # `nix-store --serve --write` imports with signature checks off, in every
        # Nix (the cross-version tests show it): its trust settings do not apply.
        return Check(
            name,
            True,
            "accepts uploads: over ssh:// Nix checks no signature (any SSH login may write)",
        )
    ssh = [*SshCommand.of(remote, False).running(), "--"]
    try:
        remote_settings = nix.remote_settings(
            ssh,
            account=account,
            env=privileges.child_env(account),
            timeout=4 * remote.connect_timeout + 10,
        )
        remote_user = resolve(remote, account).get("user", account.name)
    except CommandError as e:
        return Check(name, False, f"cannot read the remote's Nix settings: {e}", "see README#ssh")
    trusted_users = remote_settings.get("trusted-users", "").split()
    trusted_keys = set(remote_settings.get("trusted-public-keys", "").split())
    if remote_settings.get("require-sigs", "true") == "false":
        return Check(name, True, "accepts uploads (require-sigs = false)")
    if remote_user in trusted_users or "*" in trusted_users:
        return Check(name, True, f"accepts uploads ({remote_user} is a trusted user there)")
    if our_keys & trusted_keys:
        return Check(name, True, f"accepts uploads (trusts key {_names(our_keys & trusted_keys)})")
    mine = _names(our_keys) or "no key (secret-key-files is empty)"
    return Check(
        name,
        False,
        f"will refuse uploads: {remote_user} is not a trusted user there, "
        f"and it trusts none of the keys this machine signs with ({mine})",
        "add this machine's public key to trusted-public-keys in the remote's nix.conf "
        "(see README#ssh)",
    )


def _names(public_keys: set[str]) -> str:
    return ", ".join(sorted(k.split(":")[0] for k in public_keys))


def signing_public_keys(settings: dict[str, str], cfg: Config) -> set[str]:
    """The public keys (NAME:base64) of the keys paths are signed with here: Nix's
    secret-key-files and the remotes' sign_key_file, derived from the secret ones."""
    from . import sign

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
            elif os.stat(path).st_mode & 0o077:
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


def check_substituter(remote: Remote, settings: dict[str, str]) -> Check:
    """If this machine also substitutes from the remote: a cache that is away must
    cost a build seconds (connect-timeout), never a failure (fallback)."""
    name = f"remote {remote.name}"
    ours = urllib.parse.urlsplit(remote.url)
    listed = [
        url
        for url in settings.get("substituters", "").split()
        if (u := urllib.parse.urlsplit(url)).hostname == ours.hostname
        and (ours.hostname or u.path.rstrip("/") == ours.path.rstrip("/"))
    ]
    if not listed:
        return Check(name, True, "not a substituter here (this machine only uploads to it)")
    timeout = settings.get("connect-timeout", "0")
    if settings.get("fallback") != "true" or not timeout.isdigit() or not 0 < int(timeout) <= 30:
        return Check(
            name,
            False,
            f"substituter here ({listed[0]}), but with fallback = "
            f"{settings.get('fallback', 'false')} and connect-timeout = {timeout}: when it "
            "is away, builds wait minutes or fail",
            "set `fallback = true` and `connect-timeout = 5` in /etc/nix/nix.conf "
            "(see nix.conf.example)",
        )
    return Check(name, True, f"substituter here, with fallback and a {timeout} s connect-timeout")


def diagnose(config_path: str | None) -> list[Check]:
    try:
        cfg = config_mod.load(config_path)
    except NixspoolError as e:
        return [Check("config", False, str(e), "fix the line it names; see README#configuration")]
    checks = [Check("config", True, f"{cfg.path or 'no config file: defaults'}")]
    try:
        settings = nix.settings()
    except CommandError as e:
        return [*checks, Check("nix", False, str(e), "install Nix (Debian: apt install nix-bin)")]
    checks.append(check_hook(settings, running_daemon()))
    checks += check_spool(cfg)
    checks += [c for c in (check_user(cfg), check_gc_roots(cfg)) if c]
    checks += check_key_files(cfg)
    try:
        account = privileges.remote_account(cfg)
    except NixspoolError as e:
        return [*checks, Check("privileges", False, str(e), "see README#ssh")]
    keys = signing_public_keys(settings, cfg)
    for remote in cfg.remotes:
        checks += check_remote(remote, account, keys)
        checks.append(check_substituter(remote, settings))
    if not cfg.remotes:
        checks.append(
            Check(
                "remotes",
                False,
                "no remote is configured",
                "add [remotes.NAME] with a url, or run `nixspool setup`",
            )
        )
    return checks
