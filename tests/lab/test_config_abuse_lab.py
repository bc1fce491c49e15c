"""A hostile URL in the config, carried to ssh and nix copy in the lab: it never runs
what it carries.
"""

from __future__ import annotations

import json
import os
import re

import pytest

import lab
from test_config_abuse import CANARY, HOSTILE_URLS, check_answer


@pytest.mark.integration
@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_a_hostile_url_never_runs_what_it_carries(ssh_lab: lab.SshLab, url: str) -> None:
    CANARY.unlink(missing_ok=True)
    work = ssh_lab.root / f"hostile-{HOSTILE_URLS.index(url)}"
    # Paths queued under a sound config, then the url replaced by the hostile one.
    sound = f'\n[remotes.pi]\nurl = "ssh-ng://{ssh_lab.hosts[0].alias}"\n'
    config = ssh_lab.config(work, sound)
    ssh_lab.spool_in(config, ssh_lab.build(1))
    text = config.read_text()
    config.write_text(text.replace(f'"ssh-ng://{ssh_lab.hosts[0].alias}"', json.dumps(url)))
    for command in (["flush"], ["doctor"], ["status"]):
        result = ssh_lab.nixspool(config, *command, timeout=120)
        # Refused where it is written, before anything runs: the probe would not
        # get far with such a host either, but Nix and ssh are not asked to judge.
        if command == ["doctor"]:  # a report on stdout: the config check fails there
            assert result.returncode == 1, result.stdout
            assert re.search(rf"FAIL +config +{re.escape(str(config))}:\d+: url ", result.stdout)
        else:
            check_answer(config, result.returncode, result.stderr)
            assert result.returncode == 1 and "url" in result.stderr, result.stderr
        assert not CANARY.exists(), (url, command, result.stderr)
    assert os.path.exists(work / "spool" / "spool.sqlite")
