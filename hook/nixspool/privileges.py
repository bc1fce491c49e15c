"""Who runs ssh and nix copy, and with what environment.

Started as root (by NetworkManager or systemd), the flusher keeps root for
the spool and the GC roots, and runs everything that talks to a remote as
the configured `user`: the owner of the SSH key, with their ~/.ssh/config,
known_hosts and agent. Started as that user, it runs directly. Started as
anyone else, it refuses. ssh and nix copy run as root only if the config
says `run_as_root = true`.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import socket
import stat
import struct

from . import installation
from .config import Config
from .errors import PrivilegeError
from .run import Account

# Variables a child must not inherit: they would point nix at another store or
# change its settings behind the config's back (docs/ARCHITECTURE.md#contracts).
# What of nixspool's own environment reaches the programs it runs as the user: an
# allow-list, not every NIX_* variable root had. Where Nix keeps its store, state,
# settings and daemon socket, and its TLS roots (an https:// cache); the locale and
# zone. Never NIX_CONFIG or NIX_REMOTE: they would point Nix at another store or
# change its settings behind the config's back.
PASSED_ON = (
    "NIX_CONF_DIR",
    "NIX_DAEMON_SOCKET_PATH",
    "NIX_STORE_DIR",
    "NIX_STATE_DIR",
    "NIX_LOG_DIR",
    "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE",
    "TMPDIR",  # where the cache writer keeps a NAR too big for memory
    "LANG",
    "LANGUAGE",
    "TZ",
)
# ssh waits for its agent without any bound: one that never answers would hold
# every login of a flush until the server gives up on it (LoginGraceTime, 2 min).
AGENT_TIMEOUT_SECONDS = 2.0
SSH_AGENTC_REQUEST_IDENTITIES = 11

log = logging.getLogger(__name__)


def account_of(name: str) -> Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"user {name!r} (the config's 'user') does not exist") from None
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
    return Account(
        entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir, entry.pw_shell or "/bin/sh"
    )


def current_account() -> Account:
    entry = pwd.getpwuid(os.geteuid())
    return Account(
        entry.pw_name,
        entry.pw_uid,
        entry.pw_gid,
        tuple(os.getgroups()),
        os.environ.get("HOME", entry.pw_dir),
        entry.pw_shell or "/bin/sh",
    )


def remote_account(cfg: Config) -> Account:
    """The account that runs ssh and nix copy; PrivilegeError if this process may not."""
    euid = os.geteuid()
    if cfg.user:
        try:
            account = account_of(cfg.user)
        except PrivilegeError as e:
            raise PrivilegeError(f"{cfg.sources.get('user', cfg.path)}: {e}") from None
        if euid in (0, account.uid):
            return account
        me = pwd.getpwuid(euid).pw_name
        raise PrivilegeError(
            f"nixspool flush runs as root or as {cfg.user} (the config's 'user'), not as {me}"
        )
    if euid == 0 and not cfg.run_as_root:
        raise PrivilegeError(
            "started as root, and the config names no 'user': ssh and nix copy "
            'would run as root. Set user = "NAME" (who owns the SSH key), or '
            "run_as_root = true to allow it (see man nixspool: SSH)"
        )
    return current_account()


def agent_socket(account: Account, environ: dict[str, str] | None = None) -> str | None:
    """SSH_AUTH_SOCK, but only a socket that exists, belongs to that account, and
    answers: ssh and the probe then go without it (keys from ~/.ssh, ssh_key)."""
    path = (environ if environ is not None else os.environ).get("SSH_AUTH_SOCK")
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not (stat.S_ISSOCK(st.st_mode) and st.st_uid == account.uid):
        return None
    return path if _agent_answers(path) else None


@functools.cache  # asked for each child; one answer per flush is enough
def _agent_answers(path: str) -> bool:
    """Whether the agent at `path` lists its keys within AGENT_TIMEOUT_SECONDS."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
            agent.settimeout(AGENT_TIMEOUT_SECONDS)
            agent.connect(path)
            agent.sendall(struct.pack(">IB", 1, SSH_AGENTC_REQUEST_IDENTITIES))
            answered = len(agent.recv(5)) > 0
    except OSError as e:
        log.warning("ssh-agent at %s did not answer (%s); going without it", path, e)
        return False
    if not answered:
        log.warning("ssh-agent at %s closed the connection; going without it", path)
    return answered


def child_env(account: Account, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment for commands run as `account`. Its PATH is the one this
    process was given (a unit's, the person's; as root, root's decision, never the
    user's) and the usual places: a nix copy finds the ssh nixspool would."""
    env = {k: v for k, v in os.environ.items() if k in PASSED_ON or k.startswith("LC_")}
    env.update(
        HOME=account.home,
        USER=account.name,
        LOGNAME=account.name,
        SHELL=account.shell,
        PATH=installation.search_path(),
    )
    sock = agent_socket(account)
    if sock:
        env["SSH_AUTH_SOCK"] = sock
    env.update(extra or {})
    return env
