"""The CLI's bad-input contract, shared by the tests that check it: one line on stderr starting
"herd: error:", no traceback, exit status 2."""

from __future__ import annotations


def one_error_line(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("herd: error:") and "Traceback" not in err[0]
    return err[0]


def run_cli_error(argv, capsys) -> str:
    """Run `herd ARGV` in-process; it must fail with status 2 and one error line, which is returned."""
    from herd.cli import main

    assert main(argv) == 2
    return one_error_line(capsys)
