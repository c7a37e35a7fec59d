"""The CLI contract: one HYMIREC_RESULT line on success and on every error, documented exit codes."""

from __future__ import annotations

import json

import pytest

from hymirec_udfs import __version__
from hymirec_udfs.cli import EXIT_OK, EXIT_USAGE, main


def _result(out: str) -> dict:
    last = out.strip().splitlines()[-1]
    assert last.startswith("HYMIREC_RESULT "), out[-2000:]
    return json.loads(last[len("HYMIREC_RESULT "):])


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"hymirec {__version__}"


def test_config_show_ends_with_a_result_line(capsys, tmp_path) -> None:
    assert main(["config", "show", "--set", f"paths.work_dir={tmp_path}", "--set", "train.epochs=3"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "epochs: 3" in out
    assert _result(out) == {"command": "config show", "status": "success", "profile": "base"}


def test_unknown_config_key_is_a_usage_error_with_a_result_line(capsys) -> None:
    assert main(["config", "show", "--set", "train.bogus=1"]) == EXIT_USAGE
    captured = capsys.readouterr()
    result = _result(captured.out)
    assert result["status"] == "failed" and "bogus" in result["error"]
    assert "configuration error" in captured.err


def test_unknown_pipeline_stage_fails_cleanly_before_spark(capsys) -> None:
    # before: a KeyError traceback from inside run_pipeline, no result line
    assert main(["pipeline", "run", "--from", "bogus"]) == EXIT_USAGE
    captured = capsys.readouterr()
    result = _result(captured.out)
    assert result == {"command": "pipeline run", "status": "failed", "error": result["error"]}
    assert "unknown stage 'bogus'" in result["error"]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("argv, needle", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["pipeline"], "the following arguments are required: action"),
    (["train", "--log-level", "LOUD"], "argument --log-level: invalid choice: 'LOUD'"),
    (["schedule", "simulate", "--days", "two"], "argument --days: invalid int value: 'two'"),
])
def test_argument_errors_end_with_a_result_line_and_exit_2(capsys, argv, needle) -> None:
    # before: argparse printed its message and exited 2 with no result line
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == EXIT_USAGE
    captured = capsys.readouterr()
    result = _result(captured.out)
    assert result["status"] == "failed" and needle in result["error"], result
    assert needle in captured.err


def test_a_bad_run_date_is_a_usage_error_before_spark(capsys) -> None:
    assert main(["pipeline", "run", "--run-date", "30/11/2026"]) == EXIT_USAGE
    result = _result(capsys.readouterr().out)
    assert result["status"] == "failed" and "--run-date '30/11/2026' is not a date" in result["error"]


def test_schedule_simulate_is_a_command() -> None:
    from hymirec_udfs.cli import build_parser

    args = build_parser().parse_args(["schedule", "simulate", "--days", "2", "--drift-day", "2", "--users", "50"])
    assert (args.command, args.action, args.days, args.drift_day, args.users) == ("schedule", "simulate", 2, 2, 50)
