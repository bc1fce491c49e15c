"""run.py: a watched program (nix copy) read whole, in batches, and stopped when it stalls."""

from __future__ import annotations

import resource
import sys

import pytest

from nixspool import run
from nixspool.errors import CommandError

# 3000 progress-like lines, each written and flushed on its own, as Nix writes
# its JSON events, spread over about 1 s.
CHATTY = (
    "import sys, time\n"
    "for i in range(3000):\n"
    '    sys.stderr.write(\'@nix {"action":"result","id":%d}\\n\' % i); sys.stderr.flush()\n'
    "    time.sleep(0.0002)\n"
    "print('done')\n"
)


def test_a_chatty_program_is_read_whole_in_batches_not_line_by_line() -> None:
    """Every line arrives, and reading them does not wake nixspool for each one:
    the CPU a copy needs is not spent on its progress reports."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    result = run.spawn([sys.executable, "-c", CHATTY], timeout=60, stall=30).wait()
    wakeups = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before
    assert result.stdout == "done\n"
    assert result.stderr.count("\n") == 3000 and '"id":2999}' in result.stderr
    assert wakeups < 300, f"{wakeups} wake-ups for 3000 lines"


def test_a_program_that_goes_quiet_is_stopped_as_stalled() -> None:
    quiet = "import sys, time; sys.stderr.write('started\\n'); sys.stderr.flush(); time.sleep(30)"
    with pytest.raises(CommandError) as caught:
        run.spawn([sys.executable, "-c", quiet], timeout=60, stall=0.5).wait()
    assert caught.value.stalled  # (a kind of timed_out)
    assert "started" in caught.value.stderr
