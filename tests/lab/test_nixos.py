"""The NixOS module and the flake, as the pinned nixpkgs evaluates them.

`bash tests/run --nixos` evaluates tests/nixos/eval.nix with a Nix >= 2.18 (the
Debian 13 root) and runs these tests on what it printed (NIXSPOOL_NIXOS_EVAL);
other runs deselect them (`-m "not nixos"`). What the module renders must be
what nixspool itself would write: the config loads with nixspool's own loader,
the unit carries every line of the shipped unit, the dispatcher is the one
`nixspool setup` renders.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nixspool import config as config_mod
from nixspool import setup
from nixspool.hook import locate

pytestmark = pytest.mark.nixos

DATA = Path(__file__).parents[2] / "hook" / "nixspool" / "data"
CONFIGS = ("minimal", "laptop", "merged", "server")


@pytest.fixture(scope="module")
def evaluated() -> dict[str, Any]:
    path = os.environ.get("NIXSPOOL_NIXOS_EVAL")
    if not path:
        pytest.fail("NIXSPOOL_NIXOS_EVAL is not set: run `bash tests/run --nixos`", pytrace=False)
    result: dict[str, Any] = json.loads(Path(path).read_text())
    return result


def toml_text(settings: dict[str, Any]) -> str:
    """The settings as TOML (what pkgs.formats.toml writes at build time)."""

    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    lines = [f"{k} = {value(v)}" for k, v in settings.items() if k != "remotes"]
    for name, remote in settings.get("remotes", {}).items():
        lines += ["", f"[remotes.{name}]", *(f"{k} = {value(v)}" for k, v in remote.items())]
    return "\n".join(lines) + "\n"


def section(text: str, name: str) -> dict[str, list[str]]:
    """A unit file's [name] section: key -> values, comments left out."""
    values: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line
        elif current == f"[{name}]" and (found := re.fullmatch(r"([A-Za-z][A-Za-z-]*)=(.*)", line)):
            values.setdefault(found[1], []).append(found[2])
    return values


@pytest.mark.parametrize("name", CONFIGS)
def test_the_rendered_config_loads_with_nixspools_loader(
    evaluated: dict[str, Any], name: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml_text(evaluated[name]["settings"]))
    cfg = config_mod.load(str(path), environ={})
    assert cfg.user == "alice"
    assert "pi" in {r.name for r in cfg.remotes}
    if name != "merged":  # which moves it: the module's default is the program's
        assert cfg.spool == locate.ROOT_SPOOL


def test_settings_merge_with_the_options(evaluated: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml_text(evaluated["merged"]["settings"]))
    cfg = config_mod.load(str(path), environ={})
    remotes = {r.name: r for r in cfg.remotes}
    assert set(remotes) == {"pi", "cache"}  # settings.remotes added one, replaced none
    assert (remotes["pi"].url, remotes["pi"].batch_size) == ("ssh-ng://pi", 100)
    assert (cfg.spool, cfg.connect_timeout) == ("/srv/spool/nixspool.sqlite", 5)
    # The spool's directory follows the spool: created for the user, writable for the unit.
    assert "d /srv/spool 0700 alice - -" in evaluated["merged"]["tmpfiles"]
    service = section(evaluated["merged"]["service"], "Service")
    assert "/srv/spool" in service["ReadWritePaths"]
    # Filters pass through settings; the metrics file's directory is writable for the unit.
    assert remotes["pi"].exclude == ("*-source",)
    assert cfg.metrics_file == "/var/lib/prometheus/node-exporter/nixspool.prom"
    assert "/var/lib/prometheus/node-exporter" in service["ReadWritePaths"]


def test_signing_and_two_remotes(evaluated: dict[str, Any]) -> None:
    remotes = evaluated["laptop"]["settings"]["remotes"]
    assert remotes["nas"] == {
        "url": "ssh://nas",
        "ssh_key": "/home/alice/.ssh/id_nas",
        "sign_key_file": "/etc/nixspool/cache.sec",
    }
    assert remotes["pi"]["sign_key_file"] == "/etc/nixspool/cache.sec"


@pytest.mark.parametrize("name", CONFIGS)
def test_the_unit_carries_every_line_of_the_shipped_unit(
    evaluated: dict[str, Any], name: str
) -> None:
    shipped = section((DATA / "nixspool-flush.service").read_text(), "Service")
    rendered = section(evaluated[name]["service"], "Service")
    for key, values in shipped.items():
        if key in ("ExecStart", "ReadWritePaths"):  # the store path; the spool's directory
            continue
        for value in values:
            assert value in rendered.get(key, []), f"{key}={value} is missing"
    assert rendered["ExecStart"][0].endswith("/bin/nixspool flush")
    assert "-/home/alice" in rendered["ReadWritePaths"]  # ssh's known_hosts, ~/.cache/nix
    assert rendered["X-RestartIfChanged"] == ["false"]  # a switch never kills an upload
    assert evaluated[name]["postBuildHook"].endswith("/bin/nixspool-hook")


@pytest.mark.parametrize(
    ("name", "setting"),
    [
        ("minimal", "post-build-hook"),  # the pinned nixpkgs' Nix: 2.34
        ("nix235", "async-post-build-hook"),  # the hook no longer holds the build loop
        ("lix", "post-build-hook"),  # Lix 2.94 has no async-post-build-hook
        ("nix235Blocking", "post-build-hook"),  # hookSetting chosen by hand
    ],
)
def test_the_hook_runs_through_the_setting_this_nix_has(
    evaluated: dict[str, Any], name: str, setting: str
) -> None:
    chosen = {
        "post-build-hook": evaluated[name]["postBuildHook"],
        "async-post-build-hook": evaluated[name]["asyncPostBuildHook"],
    }
    assert chosen[setting] is not None and chosen[setting].endswith("/bin/nixspool-hook")
    other = next(s for s in chosen if s != setting)
    assert chosen[other] is None, f"{name}: both settings run the hook"


def test_the_timer_and_the_path_unit(evaluated: dict[str, Any]) -> None:
    shipped = section((DATA / "nixspool-flush.timer").read_text(), "Timer")
    assert "Persistent" not in shipped  # it means nothing without OnCalendar
    assert section(evaluated["minimal"]["timer"], "Timer")["OnUnitInactiveSec"] == ["10min"]
    assert section(evaluated["server"]["timer"], "Timer")["OnUnitInactiveSec"] == ["30min"]
    assert evaluated["minimal"]["path"] is None
    path = section(evaluated["server"]["path"], "Path")
    assert path["PathModified"] == ["/var/lib/nixspool/spool.sqlite-wal"]
    assert path["Unit"] == ["nixspool-flush.service"]


def test_the_dispatcher_is_the_one_setup_renders(evaluated: dict[str, Any]) -> None:
    (script,) = evaluated["laptop"]["dispatchers"]
    nixspool = re.search(r"^NIXSPOOL='(.*)'$", script, re.M)
    assert nixspool and nixspool[1].endswith("/bin/nixspool")
    nmcli = re.search(r"^NIXSPOOL_NMCLI='(.*)'$", script, re.M)
    assert nmcli and nmcli[1].endswith("/bin/nmcli")  # not on the dispatcher's PATH there
    ours = setup.render_dispatcher(nixspool[1], ("wlan0",), ("Home's WiFi",), nmcli=nmcli[1])
    assert script == ours
    # ...and sh reads the quoted names back as they were given.
    names = subprocess.run(
        ["sh", "-c", script.split("set -f")[0] + 'printf "%s|" "$NIXSPOOL_CONNECTIONS"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert names == "Home's WiFi|"
    assert evaluated["minimal"]["dispatchers"] == []  # no NetworkManager, no script


def test_the_units_path_has_nix_openssh_and_the_extra_packages(evaluated: dict[str, Any]) -> None:
    """The PATH nixspool and its children find every program on (no /usr/bin there)."""

    def path(name: str) -> list[str]:
        environment = section(evaluated[name]["service"], "Service")["Environment"]
        (line,) = [e for e in environment if e.startswith('"PATH=')]
        return line.strip('"').removeprefix("PATH=").split(":")

    names = [re.sub(r"^/nix/store/[0-9a-z]{32}-", "", d) for d in path("server")]
    assert names[0].startswith("nix-2.") and names[1].startswith("openssh-")
    assert names[2].startswith("netcat-openbsd-")  # extraPackages, for a ProxyCommand
    assert not [d for d in path("minimal") if "netcat" in d]
    assert not [d for d in path("server") if not d.startswith("/nix/store/")]


def test_networkd_dispatcher(evaluated: dict[str, Any]) -> None:
    assert evaluated["server"]["networkd"] == {"nixspool": (DATA / "50-nixspool").read_text()}


def test_an_unknown_user_is_refused_at_evaluation(evaluated: dict[str, Any]) -> None:
    (message,) = evaluated["noSuchUser"]["failedAssertions"]
    assert '"bob" is not a user of this system' in message


def test_the_flake_and_the_package(evaluated: dict[str, Any]) -> None:
    flake = evaluated["flake"]
    assert flake["package"] == flake["overlay"]  # packages.default and the overlay agree
    assert flake["package"].endswith(".drv") and flake["check"].endswith(".drv")
    assert evaluated["laptop"]["toplevel"].endswith(".drv")  # a whole system instantiates
    assert set(flake["importsCheck"]) >= {"nixspool.cli", "nixspool.hook.main"}
    root = Path(flake["sourceFiles"][0]).parent
    relative = {str(Path(p).relative_to(root)) for p in flake["sourceFiles"]}
    assert {"pyproject.toml", "README.md", "hook/nixspool/hook/main.py"} <= relative
    assert {"docs/man/nixspool.1", "docs/man/nixspool-hook.8"} <= relative  # installed
    assert "tests/unit/test_spool.py" in relative  # the check phase runs the fast tier
    assert flake["checkPaths"] == ["tests/unit"]
    outside = [p for p in relative if p.split("/")[0] in (".ci", "contrib") or "/lab/" in p]
    assert outside == []  # the lab tier, CI and contrib do not change the package
