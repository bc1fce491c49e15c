"""A hostile URL in the config, carried to ssh and nix copy in the lab: it never runs
what it carries.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest

import lab

CANARY = Path(tempfile.gettempdir()) / "nixspool-canary-config-abuse"
INJECTIONS = [
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f";touch {CANARY}",
    f"|touch {CANARY}",
    f"\ntouch {CANARY}",
    f"' \"; touch {CANARY} #",
]
HOSTILE_URLS = [
    f"ssh://-oProxyCommand=touch {CANARY}",
    f"ssh-ng://-oProxyCommand=touch${{IFS}}{CANARY}",
    f"ssh://-oProxyCommand=touch%20{CANARY}@pi",
    f"ssh://-oLocalCommand=touch%20{CANARY}@pi",
    f"ssh-ng://pi?remote-program=touch%20{CANARY}",
    f"ssh-ng://pi?remote-program=touch;{CANARY}",
    f"ssh://pi?remote-program=$(touch%20{CANARY})",
    *(f"ssh-ng://pi{i}" for i in INJECTIONS),
    *(f"ssh://{i}@pi" for i in INJECTIONS),
    f"file:///tmp/x?compression={INJECTIONS[0]}",
]


def check_answer(config: Path, code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 1), (code, err)
    if code:
        assert len(err.splitlines()) == 1, err
        assert re.match(rf"error: {re.escape(str(config))}:\d+: \S", err), err


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
