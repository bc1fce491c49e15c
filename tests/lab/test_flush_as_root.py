"""A flush started as root: who it runs ssh and nix copy as."""

from __future__ import annotations

import os

import pytest

from nixspool import privileges
from nixspool.config import Config
from nixspool.errors import PrivilegeError


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can be 'root without a user'")
def test_root_without_a_user_is_refused_unless_allowed() -> None:
    with pytest.raises(PrivilegeError, match="the config names no 'user'"):
        privileges.remote_account(Config(spool="/s"))
    assert privileges.remote_account(Config(spool="/s", run_as_root=True)).uid == 0
