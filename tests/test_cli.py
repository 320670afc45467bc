"""The one command line: ``fne-dist COMMAND`` (and ``python -m fne_dist``) reaches every tool,
lists the config keys and prints a resolved config. Called in-process: no process starts."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from fne_dist import cli
from fne_dist.config import load_config
from fne_dist.config_reference import config_keys, reference_markdown, yaml_value
from fne_dist.train import parse_args

ROOT = Path(__file__).resolve().parents[1]
# What help text written for users never contains: tracker codes, docstring markup.
NOT_FOR_USERS = re.compile(r"#\d|\bissue\b|\bitem \d|\bH\d+\b|``|:mod:|:func:", re.IGNORECASE)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's --help and usage errors
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_is_declared() -> None:
    """Invariant: the installed package declares the ``fne-dist`` console script (pip puts it
    on PATH), running ``cli.main``."""
    found = importlib.metadata.entry_points(group="console_scripts", name="fne-dist")
    assert [e.value for e in found] == ["fne_dist.cli:main"]


def test_top_help_lists_every_command_in_user_words(capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: ``fne-dist --help`` names train, evaluate, export, shards, plot and config
    with a line each, and carries no tracker codes or docstring markup; no command is an
    error with status 2."""
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for name in ("train", "evaluate", "export", "shards", "plot", "config"):
        assert re.search(rf"^\s+{name}\s+\w", out, re.MULTILINE), (name, out)
    assert not NOT_FOR_USERS.search(out), out
    assert _run([], capsys)[0] == 2
    code, _, err = _run(["trian"], capsys)
    assert code == 2 and "invalid choice: 'trian'" in err


def test_python_dash_m_fne_dist_is_the_same_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: ``python -m fne_dist ARGS`` runs ``fne-dist ARGS`` (the package's
    __main__), so it prints the same help."""
    expected = _run(["--help"], capsys)[1]
    monkeypatch.setattr(sys, "argv", ["fne_dist", "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("fne_dist", run_name="__main__", alter_sys=True)
    assert stop.value.code == 0
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c.name != "config"])
def test_each_command_hands_its_arguments_to_its_module(
    command: cli.Command, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: ``fne-dist NAME ARGS`` calls the module behind ``python -m fne_dist.NAME``
    with ARGS untouched and returns its exit status."""
    module = importlib.import_module(command.module)
    seen: list[list[str]] = []

    def fake_main(argv: list[str] | None = None) -> int:
        seen.append(list(argv or []))
        return 7

    monkeypatch.setattr(module, "main", fake_main)
    assert cli.main([command.name, "a", "--b", "c=d"]) == 7
    assert seen == [["a", "--b", "c=d"]]


def test_train_help_is_for_users_and_train_keeps_its_own_entry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Invariant: ``fne-dist train --help`` names itself, shows --config, the overrides and
    -v, says what the exit statuses mean, with no tracker codes or docstring markup; ``-v``
    is the override report.console=full, appended after the user's own."""
    code, out, _ = _run(["train", "--help"], capsys)
    assert code == 0 and out.startswith("usage: fne-dist train")
    for needle in ("--config FILE", "key=value", "-v, --verbose", "exit status", "75"):
        assert needle in out, needle
    assert not NOT_FOR_USERS.search(out), out
    verbose = parse_args(["fne.prior=1e-3", "-v", "optim.lr=3e-5"]).overrides
    assert verbose == ["fne.prior=1e-3", "optim.lr=3e-5", "report.console=full"]
    assert parse_args(["fne.prior=1e-3"]).overrides == ["fne.prior=1e-3"]


def _every_help_command() -> list[list[str]]:
    """Every command and subcommand a user can ask --help of (shards' and config's from their
    parsers, so a new one is covered without editing this list)."""
    from fne_dist.shards.__main__ import build_parser

    found = [[c.name] for c in cli.COMMANDS]
    for name, parser in (("shards", build_parser()), ("config", cli.config_parser())):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        found += [[name, action] for action in sub.choices]
    return found


@pytest.mark.parametrize("command", _every_help_command(), ids=" ".join)
def test_every_command_help_is_written_for_users(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: ``fne-dist COMMAND [SUBCOMMAND] --help`` exits 0 with a usage line that
    names the command as the user typed it (not ``python -m fne_dist.X``), a description of
    what it does, and no tracker codes, docstring markup or module paths: help is written
    for users, not copied from module docstrings."""
    code, out, _ = _run([*command, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: fne-dist {' '.join(command)} "), out
    description = out.split("\n\n")[1]
    assert not description.startswith(("positional arguments", "options")), out
    assert len(description.split()) >= 5, out
    assert not NOT_FOR_USERS.search(out), out
    assert "python -m" not in out and "fne_dist." not in out.replace("fne_dist.api", ""), out


def test_config_keys_lists_every_key_with_default_range_and_doc(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Invariant: ``fne-dist config keys`` prints every config key once, with its type, its
    default as YAML writes it, its valid values and its doc; ``--format markdown`` is the
    reference page docs/configuration.md, byte for byte."""
    code, out, _ = _run(["config", "keys"], capsys)
    assert code == 0
    lines = out.splitlines()
    keys = config_keys()
    assert len(lines) == 2 * len(keys)
    for item, head, doc in zip(keys, lines[::2], lines[1::2], strict=True):
        assert head.startswith(f"{item.key} ({item.type}) = {yaml_value(item.default)}    valid: ")
        assert doc == f"    {item.doc}" and item.doc
    assert "fne.prior (float) = " in out and "valid: > 0.0, < 1.0" in out
    assert "report.console (str) = short    valid: short | full" in out
    code, out, _ = _run(["config", "keys", "--format", "markdown"], capsys)
    assert code == 0 and out == reference_markdown()
    assert out == (ROOT / "docs" / "configuration.md").read_text()


def test_config_show_prints_a_config_that_reads_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Invariant: ``fne-dist config show`` prints the resolved config of the file and the
    overrides as YAML that ``--config`` reads back to the same config (default file: the one
    training uses); a bad key is one line and status 2."""
    cfg_file = ROOT / "configs" / "reference.yaml"
    code, out, _ = _run(["config", "show", "--config", str(cfg_file), "fne.eps=0.3"], capsys)
    assert code == 0 and out.startswith(f"# resolved: {cfg_file} + fne.eps=0.3\n")
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    assert load_config(shown) == load_config(cfg_file, ["fne.eps=0.3"])
    assert yaml.safe_load(out)["fne"]["eps"] == 0.3
    code, out, _ = _run(["config", "show"], capsys)
    assert code == 0 and "configs/default.yaml" in out.splitlines()[0]
    code, out, err = _run(["config", "show", "fne.prio=1"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "fne.prio" in err
