"""`nixspool verify`, and the check after each signed batch: read the paths'
signatures back from the remote, as the user, and check them with the public
half of the remote's signing key. The result is kept per delivery (`verified`),
so `status` and `list` show it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from . import nix, sign
from .config import Remote
from .run import Account
from .spool import Spool

log = logging.getLogger(__name__)


def check(
    remote: Remote,
    key: sign.SecretKey,
    paths: Sequence[str],
    spool: Spool,
    *,
    account: Account,
    env: Mapping[str, str],
) -> dict[str, bool]:
    """{path: has a valid signature by `key` on the remote}; recorded in the spool.

    CommandError if the remote cannot be asked (the caller tells "away" apart).
    """
    if not paths:
        return {}
    infos = nix.path_infos(
        list(paths), store=remote.url, env=env, account=account, timeout=remote.copy_timeout
    )
    verdicts = {p: p in infos and sign.verify(infos[p], key.public) for p in paths}
    spool.queue.set_verified(remote.name, verdicts)
    for path, ok in verdicts.items():
        if not ok:
            log.error(
                "%s: %s has no valid signature by %s on the remote", remote.name, path, key.name
            )
    return verdicts
