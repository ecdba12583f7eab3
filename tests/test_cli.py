"""The command line: tables it prints and errors it reports without a traceback."""

import subprocess
import sys

import pytest

from offloadkit.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offloadkit.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_info_prints_breakdown(capsys):
    assert main(["info", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "routed experts" in out and "46.70 B" in out and "12.88 B" in out
    assert "86.99 GiB" in out


@pytest.mark.parametrize("args, message", [
    (["info", "/no/such/model"], "no model named '/no/such/model'"),
    (["info", "not-a-zoo-model"], "mixtral-8x7b"),
])
def test_errors_are_one_line_without_traceback(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("offloadkit: error:") and message in r.stderr


def test_unsupported_architecture_from_cli(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    r = run_cli("info", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'bert' is not supported" in r.stderr
