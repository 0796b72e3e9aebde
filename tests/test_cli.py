"""The ``geolink`` command: help and info (the job subcommands are tested with their features)."""

from __future__ import annotations

import subprocess
import sys

import geolink
from geolink.cli import main


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "geolink.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("info", "convert"):
        assert command in result.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: geolink" in capsys.readouterr().out


def test_info_prints_versions_and_registered_models(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"geolink {geolink.__version__}" in out and "torch " in out
    for name in geolink.list_models() + geolink.list_pretrained():
        assert name in out
