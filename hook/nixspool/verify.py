"""`nixspool verify`, and the check after each signed batch: read the paths'
signatures back from the remote, as the user, and check them with the public
half of the remote's signing key. The result is kept per delivery (`verified`),
so `status` and `list` show it.

A path the remote had before (uploaded unsigned, or by another tool) keeps the
signatures it came with: Nix adds none when it is copied again (NixOS/nix#4981).
Such a path is signed on the remote itself (`sign.push`) when its hash, size and
references there are those of the local store, which nixspool's key vouches for;
a path the remote holds with other content is never signed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import nix, sign
from .config import Remote
from .errors import CommandError
from .run import Account, last_line
from .spool import Spool

log = logging.getLogger(__name__)


@dataclass
class Verdicts:
    """{path: valid signature by our key on the remote}, and the paths signed there now."""

    ok: dict[str, bool] = field(default_factory=dict)
    resigned: list[str] = field(default_factory=list)

    @property
    def bad(self) -> list[str]:
        return sorted(p for p, ok in self.ok.items() if not ok)


def check(
    remote: Remote,
    key: sign.SecretKey,
    paths: Sequence[str],
    spool: Spool,
    *,
    account: Account,
    env: Mapping[str, str],
) -> Verdicts:
    """Check `paths` on the remote, signing there the ones it had without our
    signature; recorded in the spool.

    CommandError if the remote cannot be asked (the caller tells "away" apart).
    """
    if not paths:
        return Verdicts()

    def read_back(wanted: Sequence[str]) -> tuple[dict[str, bool], list[str]]:
        """({path: verified}, the paths the remote has without our signature)."""
        infos = nix.path_infos(
            list(wanted), store=remote.url, env=env, account=account, timeout=remote.copy_timeout
        )
        ok = {p: p in infos and sign.verify(infos[p], key.public) for p in wanted}
        return ok, [p for p in wanted if p in infos and not ok[p]]

    ok, unsigned = read_back(paths)
    verdicts = Verdicts(ok)
    tried = _resign(remote, key, unsigned, account=account, env=env) if unsigned else []
    if tried:
        # Nix skips, silently, a path whose hash, size or references on the remote
        # differ from ours: only what now checks out was signed there.
        again, _ = read_back(tried)
        verdicts.ok |= again
        verdicts.resigned = [p for p in tried if again[p]]
    if verdicts.resigned:
        log.info(
            "%s: signed %d paths it already had without our signature",
            remote.name,
            len(verdicts.resigned),
        )
    spool.queue.set_verified(remote.name, verdicts.ok)
    for path in verdicts.bad:
        log.error("%s: %s has no valid signature by %s on the remote", remote.name, path, key.name)
    return verdicts


def _resign(
    remote: Remote,
    key: sign.SecretKey,
    paths: Sequence[str],
    *,
    account: Account,
    env: Mapping[str, str],
) -> list[str]:
    """Sign on the remote what it holds without our signature; the paths tried."""
    local = nix.path_infos(list(paths))
    infos = [local[p] for p in paths if p in local]
    try:
        sign.push(key, infos, remote.url, env=env, account=account, timeout=remote.copy_timeout)
    except CommandError as e:
        why = last_line(e.stderr) if e.stderr else str(e)
        hint = (
            " (ssh:// cannot add signatures to a path the remote has; ssh-ng:// can)"
            if remote.url.startswith("ssh://")
            else " (the remote's Nix must count this user among its trusted-users)"
        )
        log.error("%s: cannot sign the paths it already had: %s%s", remote.name, why, hint)
        return []
    return [info.path for info in infos]
