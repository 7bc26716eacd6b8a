"""`imagegen` run for a test, two ways with one result (a CompletedProcess: exit code, stdout,
stderr). `imagegen` runs the entry point's own `server.cli.main` inside the test process, with
argv, the environment and the standard streams swapped for the run: the same commands, exit
codes and error lines as a real process, without a new process importing torch and diffusers
(about six seconds a run on two cores). `imagegen_process` is a real `python -m server.cli`,
for what only a process shows: its exit status as the OS reports it, signals, fd-level output
(C extensions, stray prints) kept off stdout, environment read at import time, files left by a
killed process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

from click.testing import CliRunner

IMAGEGEN = [sys.executable, "-m", "server.cli"]
DEADLINE_S = 180


def imagegen_process(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IMAGEGEN, *args], env=env, capture_output=True, text=True, timeout=DEADLINE_S, cwd=cwd
    )


def imagegen(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`main()` as `imagegen ARGS` with exactly `env` as its environment (variables the test
    process has and `env` lacks are unset for the run) and `cwd` as its folder; everything is
    put back after. An exception that escapes `main()` ends the run as it ends a process: its
    traceback on stderr, exit code 1."""
    from server import cli

    changes: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    changes.update({k: v for k, v in env.items() if os.environ.get(k) != v})
    # CliRunner.isolation: sys.stdin/stdout/stderr on buffers of their own (stdout is not a
    # terminal, as on a pipe) and the environment changed, both restored on exit.
    runner = CliRunner()
    with (
        runner.isolation(env=changes) as (stdout, stderr, _),
        mock.patch.object(sys, "argv", ["imagegen", *args]),
        contextlib.chdir(cwd or Path.cwd()),
    ):
        try:
            cli.main()
            code = 0  # main() always exits; this is only for a future one that returns
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                sys.stderr.write(exc.code + "\n")
        except Exception:
            traceback.print_exc()  # to the swapped sys.stderr, as the interpreter would
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        out, err = stdout.getvalue().decode(), stderr.getvalue().decode(errors="replace")
    return subprocess.CompletedProcess(["imagegen", *args], code, out, err)
