"""`nixspool doctor`: is this machine set up right? One line per check, with the fix.

Checks, in the order a setup goes wrong: the config; then this machine
(machine.py: the hook, the spool, the GC roots, the user, the keys); then each
remote (remote.py: ssh's resolution, the login, Nix there, trust, substituting).
"""

from __future__ import annotations

from .. import config as config_mod
from .. import nix, privileges
from ..errors import CommandError, NixspoolError
from .check import Check
from .machine import (
    check_gc_roots,
    check_hook,
    check_key_files,
    check_spool,
    check_user,
    running_daemon,
    signing_public_keys,
)
from .remote import check_remote, check_substituter

__all__ = ["Check", "check_hook", "check_substituter", "diagnose"]


def diagnose(config_path: str | None) -> list[Check]:
    try:
        cfg = config_mod.load(config_path)
    except NixspoolError as e:
        return [
            Check("config", False, str(e), "fix the line it names; see man nixspool: Configuration")
        ]
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
        return [*checks, Check("privileges", False, str(e), "see man nixspool: SSH")]
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
