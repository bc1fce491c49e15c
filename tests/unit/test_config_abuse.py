"""Abuse of the config: arbitrary and truncated TOML, wrong types, unknown keys, huge,
negative and non-finite numbers, remote names and URLs carrying spaces, quotes, ';',
'$()', newlines, a leading '-' (ssh://-oProxyCommand=...) or ?remote-program=.

Oracle: every command either works or says one line, `error: FILE:LINE: ...`, and
exits 1; nothing injected ever runs. Generated configs go through `nixspool config`
and `status` in-process (fast, every Python of the matrix); the hostile URLs also
go through a real `nixspool flush` as root against the lab, with a canary file that
any injected command would create.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from nixspool.cli import app

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
KEYS = [
    "accept_new_host_keys", "user", "connect_timeout", "copy_timeout", "retry_min", "retry_max",
    "batch_size", "gc_roots", "run_as_root", "metrics_file", "log_level", "unknown",
]  # fmt: skip
REMOTE_KEYS = [
    "url", "ssh_key", "sign_key_file", "verify", "include", "exclude", "max_size",
    "batch_size", "connect_timeout", "skip_signed_by", "compression", "nope",
]  # fmt: skip

# URLs Python's own parser refuses (found by an adversarial run: "ssh-ng://[::1"
# ended every command in a ValueError traceback), and the generator that finds
# such forms: a scheme nixspool knows, then an authority and path made of the
# characters that mean something to a URL parser.
MALFORMED_URLS = [
    "ssh-ng://[::1",
    "ssh://[zz]",
    "ssh://pi:port",
    "ssh-ng://pi:99999",
    "sftp://pi:-1/cache",
    "sftp://[::1/cache",
    "file://[",
    "s3://bucket]?endpoint=[::1",
    "http://[::1]:70000/cache",
]
URL_CHARACTERS = "[]:@/?#%.-_aZ09 "
urls = st.builds(
    lambda scheme, rest: scheme + rest,
    st.sampled_from(["ssh://", "ssh-ng://", "sftp://", "file://", "s3://", "http://", "daemon"]),
    st.text(alphabet=URL_CHARACTERS, max_size=20),
)
strings = st.one_of(
    st.sampled_from([*INJECTIONS, *HOSTILE_URLS, *MALFORMED_URLS, "", "-", "--help", "1G"]),
    st.sampled_from(["ssh-ng://pi"]),
    urls,
    st.text(max_size=40),
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 2**63, 10**9 + 1, 1e308]),
)
values = st.recursive(
    st.one_of(strings, numbers, st.booleans()),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=4,
)
names = st.one_of(
    st.sampled_from(["pi", "nas", "a b", "-x", "a;b", "$(x)", "a\nb"]), st.text(max_size=12)
)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


@st.composite
def configs(draw: st.DrawFn) -> str:
    lines = [
        f"{draw(st.sampled_from(KEYS))} = {toml_value(draw(values))}"
        for _ in range(draw(st.integers(0, 3)))
    ]
    for _ in range(draw(st.integers(0, 2))):
        lines.append(f"[remotes.{json.dumps(draw(names))}]")
        url = draw(st.one_of(strings, urls, st.sampled_from(HOSTILE_URLS + MALFORMED_URLS)))
        lines.append(f"url = {toml_value(url)}")
        lines += [
            f"{draw(st.sampled_from(REMOTE_KEYS))} = {toml_value(draw(values))}"
            for _ in range(draw(st.integers(0, 2)))
        ]
    text = "\n".join(lines) + "\n"
    cut = draw(st.one_of(st.none(), st.integers(0, len(text))))
    return text if cut is None else text[:cut]  # truncated: a write cut short


def check_answer(config: Path, code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 1), (code, err)
    if code:
        assert len(err.splitlines()) == 1, err
        assert re.match(rf"error: {re.escape(str(config))}:\d+: \S", err), err


@settings(deadline=None, suppress_health_check=list(HealthCheck))
@given(configs())
def test_any_config_is_taken_or_refused_in_one_line_naming_file_and_line(text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="nixspool-config-") as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(f'spool = "{tmp}/spool/spool.sqlite"\n' + text)
        runner = CliRunner()
        for command in (["config"], ["status", "--json"]):
            result = runner.invoke(app, ["--config", str(config), *command])
            if result.exception and not isinstance(result.exception, SystemExit):
                raise result.exception
            check_answer(config, result.exit_code, result.stderr)
    assert not CANARY.exists()


@pytest.mark.parametrize("url", MALFORMED_URLS)
@pytest.mark.parametrize("command", [["config"], ["status"], ["list"], ["verify"], ["flush"]])
def test_a_url_no_parser_reads_is_one_error_line_in_every_command(
    tmp_path: Path, url: str, command: list[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'spool = "{tmp_path}/spool/spool.sqlite"\n\n[remotes.pi]\nurl = {json.dumps(url)}\n'
    )
    result = CliRunner().invoke(app, ["--config", str(config), *command])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    check_answer(config, result.exit_code, result.stderr)
    assert result.exit_code == 1 and f"{config}:4: url " in result.stderr, result.stderr


def test_a_user_name_with_a_newline_is_one_line_of_error(tmp_path: Path) -> None:
    """Found by the thorough profile: a `user` value is quoted, so it cannot start a
    second line of output that reads like nixspool's own."""
    config = tmp_path / "config.toml"
    config.write_text('user = "\\ntouch /tmp/nixspool-canary-config-abuse"\n')
    result = CliRunner().invoke(app, ["--config", str(config), "status"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "'\\ntouch" in result.output
