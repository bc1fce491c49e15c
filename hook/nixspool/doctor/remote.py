"""`nixspool doctor`, each remote: how the user's ssh reaches it (`ssh -G`), the
SSH login as the user (the flusher's own probe: their ssh), Nix on the remote,
whether it will accept uploads (a trusted user there, or a signature by a key it
trusts), a cache directory nixspool writes, and, if this machine substitutes from
it, with fallback and a connect-timeout.
"""

from __future__ import annotations

import urllib.parse

from .. import nix, privileges
from ..config import Remote
from ..errors import CommandError
from ..outcome import Outcome, classify, unsupported_store
from ..probe import (
    ProbeResult,
    SshCommand,
    Verdict,
    nix_ssh_env,
    resolve,
    start_probe,
    verdict,
)
from ..run import Account, last_line
from .check import Check


def check_remote(remote: Remote, account: Account, our_keys: set[str]) -> list[Check]:
    name = f"remote {remote.name}"
    if remote.is_s3_cache:
        return [_bucket(remote, account, name)]
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
            f"fix {account.name}'s ~/.ssh/config (or /etc/ssh/ssh_config); see man nixspool: SSH",
        )
    via = [f"{key} {found[key]}" for key in ("proxyjump", "proxycommand") if key in found]
    where = f"{found.get('user', '?')}@{found.get('hostname', '?')}:{found.get('port', '22')}"
    return Check(
        name, True, f"ssh reaches it as {where}" + (f" via {', '.join(via)}" if via else "")
    )


def _cache_directory(remote: Remote, account: Account, name: str) -> Check:
    """The directory of a cache nixspool writes (sftp://): there, and for this store."""
    from .. import static_cache

    directory = static_cache.directory_of(remote.url)
    try:
        result = static_cache.read_cache(remote, account, accept_new_host_keys=False)
    except CommandError as e:
        return Check(
            name, False, f"reading {directory} failed: {e}", "see man nixspool: Static caches"
        )
    if result.error is not None:
        return Check(
            name,
            False,
            f"cache directory {directory}: {result.error['message']}",
            f"create {directory} on the host, writable by the SSH login "
            "(see man nixspool: Static caches)",
        )
    return Check(
        name, True, f"cache directory {directory} is there ({result.narinfo_files} paths in it)"
    )


def _bucket(remote: Remote, account: Account, name: str) -> Check:
    """An s3:// cache: the user's credentials, the bucket listed, a probe object
    written and deleted, its nix-cache-info."""
    from .. import static_cache

    try:
        result = static_cache.read_cache(
            remote, account, accept_new_host_keys=False, probe_write=True
        )
    except CommandError as e:
        return Check(name, False, f"reading the bucket failed: {e}", "see man nixspool: S3")
    if result.error is not None:
        return Check(
            name,
            False,
            f"as {account.name}: {result.error['message']}",
            f"check {account.name}'s credentials and the bucket (see man nixspool: S3)",
        )
    notes = "".join(f"; {note}" for note in result.notes)
    return Check(
        name,
        True,
        f"bucket writable as {account.name} (credentials from {result.credentials}; "
        f"{result.narinfo_files} paths in it){notes}",
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
        return Check(
            name, False, f"cannot read the remote's Nix settings: {e}", "see man nixspool: SSH"
        )
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
        "(see man nixspool: SSH)",
    )


def _names(public_keys: set[str]) -> str:
    return ", ".join(sorted(k.split(":")[0] for k in public_keys))


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
