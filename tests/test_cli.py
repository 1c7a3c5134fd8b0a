"""The command line's error convention (liteattn.cli): a bad value is one line on stderr, exit code 2, before
any work starts; bugs keep their traceback."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

from liteattn import cli


@pytest.fixture
def fake(monkeypatch):
    """A subcommand ``fake`` (one ``--steps`` option) whose check and run are set by the test; ``ran`` records
    whether ``run`` was reached."""
    module = types.ModuleType("liteattn_fake_subcommand")
    module.ran = []

    def add_arguments(parser):
        parser.add_argument("--steps", type=int, default=1)

    module.add_arguments = add_arguments
    module.run = lambda args: module.ran.append(args.steps) or 0
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "_SUBCOMMANDS", {"fake": (module.__name__, "a subcommand for the tests")})
    return module


def _steps_at_least_one(args):
    if args.steps < 1:
        raise ValueError(f"--steps: expected at least 1, got {args.steps}")


def test_check_args_runs_before_run_and_its_error_is_one_line(fake, capsys):
    fake.check_args = _steps_at_least_one
    assert cli.main(["fake", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "liteattn fake: --steps: expected at least 1, got 0\n"
    assert fake.ran == []  # no work started
    assert cli.main(["fake", "--steps", "3"]) == 0 and fake.ran == [3]


def test_a_value_error_from_run_is_one_line_too(fake, capsys):
    def run(args):
        raise ValueError("threshold: expected a negative float,\n  got 3.0")

    fake.run = run
    assert cli.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err == "liteattn fake: threshold: expected a negative float, got 3.0\n" and "Traceback" not in err


def test_other_errors_keep_their_traceback(fake):
    def run(args):
        raise RuntimeError("a bug")

    fake.run = run
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["fake"])


def test_argparse_errors_are_one_line_and_help_returns_0(fake, capsys):
    assert cli.main(["fake", "--steps", "many"]) == 2
    assert capsys.readouterr().err == ("liteattn fake: --steps: invalid int value: 'many' "
                                       "(see liteattn fake --help)\n")
    assert cli.main(["fake", "--unknown"]) == 2
    assert capsys.readouterr().err == "liteattn fake: unrecognized arguments: --unknown (see liteattn fake --help)\n"
    assert cli.main(["fake", "--steps", "a  b"]) == 2  # the value as given, spaces and all
    assert capsys.readouterr().err == "liteattn fake: --steps: invalid int value: 'a  b' (see liteattn fake --help)\n"
    assert cli.main(["--help"]) == 0
    assert fake.ran == []


def test_a_type_function_naming_its_option_is_not_named_twice(capsys):
    """bench's list options raise ``--shapes: ...`` from their type function; argparse adds ``argument --shapes:``."""
    assert cli.main(["bench", "--shapes", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("liteattn bench: --shapes: unknown name(s) ['nope']") and err.count("\n") == 1, err


def test_run_exit_codes_pass_through(fake):
    fake.run = lambda args: 1
    assert cli.main(["fake"]) == 1


def test_bench_out_under_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Checked before the GPU check of ``run`` (which returns 1 on this machine), and before any timing."""
    monkeypatch.setattr(cli, "_SUBCOMMANDS", {"bench": cli._SUBCOMMANDS["bench"]})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["bench", "--quick", "--out", str(blocker / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"liteattn bench: --out: expected a folder for bench.json, bench.txt and bench.png, but "
                          f"'{blocker}' is a file") and err.count("\n") == 1


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    """Through the interpreter, as a user runs it: exit status 2 and a single line on stderr."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = subprocess.run([sys.executable, "-m", "liteattn", "bench", "--out", str(blocker / "r")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("liteattn bench: --out:") and res.stderr.count("\n") == 1, res.stderr
