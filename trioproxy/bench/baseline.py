"""``--baseline REV`` / ``--baseline-python PATH``: another build of the gateway, measured beside this one.

This guest's speed moves by tens of percent between runs, so two builds compared in
two runs tell more about the machine than about the change. A baseline is measured
in the same run instead: its gateway is one more target in the interleaved rounds
(direct, gateway, gateway@REV, floor, …), started from the same interpreter, with
the same profiles and pinning, only its ``trioproxy`` package taken from ``REV``.

How: ``git archive REV trioproxy`` is unpacked into the run's directory, and that
gateway is started with ``PYTHONPATH`` pointing there first and ``PYTHONSAFEPATH=1``
(no working directory ahead of it: ``python -m`` would put the checkout's own
``trioproxy`` first). Both are environment variables, so the processes it starts
(``serve --workers N``) inherit them. :func:`unpack` then starts the interpreter
once the same way and checks that ``import trioproxy`` really finds the unpacked
copy, not the installed one. The baseline runs with this checkout's bench profiles:
a revision whose profile schema differs fails to start, and says why.

``--baseline-python PATH`` runs the twin under another interpreter (say, an optimized
build of CPython: docs/operations.md), with this checkout's ``trioproxy`` on its
``PYTHONPATH`` in the same way, or with REV's when ``--baseline`` is given too. That
interpreter needs the gateway's dependencies (a virtual environment of its own with
trioproxy installed); the same import check says which ``trioproxy`` it found. The load
generator, the mock and the floor stay on this interpreter.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from attrs import frozen

from .processes import BenchError
from .scenarios import CHECKOUT

__all__ = ["Baseline", "resolve", "this_checkout", "unpack"]

#: ``git`` and the import check each get this long (an archive of the package is a few hundred KB).
GIT_TIMEOUT_S = 60.0


@frozen
class Baseline:
    """A build of the gateway to measure beside this one: a revision's ``trioproxy`` package,
    unpacked, or this checkout's, each under this interpreter or another, and checked to be
    the one a child of that interpreter imports."""

    #: As given on the command line (``HEAD~3``, ``v0.1``, a commit); None: this checkout's code.
    revision: str | None
    #: The full commit id it names (None: this checkout's code).
    commit: str | None
    #: The directory holding the ``trioproxy/`` it runs: the baseline gateway's ``PYTHONPATH``.
    source: Path
    #: Another interpreter's path (``--baseline-python``), or None: this one.
    python: str | None = None
    #: That interpreter's version (``3.11.2``), as it said in the import check.
    python_version: str | None = None

    @property
    def suffix(self) -> str:
        """Appended to a gateway's label for its baseline twin: ``gateway@1a2b3c4``, ``gateway@py3.11.2``,
        ``gateway@1a2b3c4-py3.11.2``."""
        parts = [self.commit[:7]] if self.commit is not None else []
        if self.python is not None:
            parts.append(f"py{self.python_version}")
        return "@" + "-".join(parts)

    @property
    def interpreter(self) -> str:
        return self.python if self.python is not None else sys.executable

    def describe(self) -> str:
        """What the twin runs, for the report: ``trioproxy as committed at HEAD~1 (<commit>)``, and the interpreter."""
        code = ("this checkout's trioproxy" if self.commit is None
                else f"trioproxy as committed at {self.revision} ({self.commit})")
        if self.python is None:
            return code + ", with the same interpreter"
        return code + f", under {self.python} (Python {self.python_version})"

    def env_changes(self) -> dict[str, str]:
        """What differs from our environment: the unpacked source first, no working directory."""
        pythonpath = os.environ.get("PYTHONPATH")
        first = str(self.source) + (os.pathsep + pythonpath if pythonpath else "")
        return {"PYTHONPATH": first, "PYTHONSAFEPATH": "1"}

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.env_changes()}


def _run(argv: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(argv, capture_output=True, timeout=GIT_TIMEOUT_S, check=False, **kwargs)
    except (FileNotFoundError, PermissionError):
        raise BenchError(f"cannot run {argv[0]} (not there, or not executable)") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"--baseline: {what} took over {GIT_TIMEOUT_S:g} s") from None


def _git(repo: Path, *args: str, failed: str) -> bytes:
    done = _run(["git", "-C", str(repo), *args], f"git {args[0]}")
    if done.returncode:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise BenchError(f"--baseline: {failed}" + (f" ({detail[-1]})" if detail else ""))
    return done.stdout


def resolve(revision: str, *, repo: Path = CHECKOUT) -> str:
    """The full commit id ``revision`` names in ``repo``.

    Raises:
      BenchError: not a git checkout, or no such commit.
    """
    if not (repo / ".git").exists():
        raise BenchError(f"--baseline needs a git checkout of trioproxy; {repo} is not one")
    if revision.startswith("-"):  # never an option to git
        raise BenchError(f"--baseline: {revision!r} is not a revision")
    return _git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}",
                failed=f"{revision!r} names no commit in {repo}").decode().strip()


def unpack(revision: str, commit: str, into: Path, *, repo: Path = CHECKOUT, python: str | None = None) -> Baseline:
    """Unpack ``commit``'s ``trioproxy`` package under ``into`` and check a child imports it from there.

    Raises:
      BenchError: a revision without the package, a package that does not import with
        this interpreter, or an interpreter that imports another ``trioproxy`` all the
        same (an import hook of some editable installs comes before ``PYTHONPATH``).
    """
    archive = _git(repo, "archive", "--format=tar", commit, "--", "trioproxy",
                   failed=f"revision {revision} ({commit[:12]}) has no trioproxy package")
    source = into / f"baseline-{commit[:12]}"
    source.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):  # 3.11.4+: refuse links and paths out of the directory
                tar.extractall(source, filter="data")
            else:  # pragma: no cover - older 3.11 patch releases; the archive is our own repository's
                tar.extractall(source)
    except (tarfile.TarError, OSError) as exc:
        raise BenchError(f"--baseline: cannot unpack revision {revision} into {source}: {exc}") from None
    if not (source / "trioproxy" / "__init__.py").is_file():
        raise BenchError(f"--baseline: revision {revision} ({commit[:12]}) has no trioproxy package")
    return _checked(Baseline(revision=revision, commit=commit, source=source, python=python),
                    f"revision {revision}'s trioproxy")


def this_checkout(python: str) -> Baseline:
    """This checkout's ``trioproxy`` under another interpreter (``--baseline-python`` alone).

    Raises:
      BenchError: an interpreter that cannot run, or that does not import this checkout's
        ``trioproxy`` (its dependencies missing, or another copy ahead of ``PYTHONPATH``).
    """
    # Its server module, not the package alone: that imports what a gateway needs (trio, Hypercorn...).
    return _checked(Baseline(revision=None, commit=None, source=CHECKOUT, python=python), "this checkout's trioproxy",
                    module="trioproxy.server")


def _checked(baseline: Baseline, what: str, *, module: str = "trioproxy") -> Baseline:
    """``baseline``, its interpreter's version filled in, once a child of it imports ``module`` of its ``trioproxy``."""
    code = f"import platform, trioproxy, {module}; print(trioproxy.__file__); print(platform.python_version())"
    probe = _run([baseline.interpreter, "-c", code], "the import check", env=baseline.env())
    if probe.returncode:
        lines = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        where = f" under {baseline.python}" if baseline.python is not None else " here"
        raise BenchError(f"--baseline: {what} does not import{where}: "
                         f"{lines[-1] if lines else f'exit status {probe.returncode}'}")
    said = probe.stdout.decode("utf-8", "replace").strip().splitlines()
    if len(said) != 2 or not all(said):  # (not a Python interpreter: /bin/true says nothing)
        raise BenchError(f"--baseline: {baseline.interpreter} did not answer as a Python interpreter "
                         f"(it printed {len(said)} line(s) for the import check)")
    file, version = said
    imported = Path(file).resolve()
    source = baseline.source
    if not imported.is_relative_to(source.resolve()):
        raise BenchError(f"--baseline: the interpreter imported trioproxy from {imported}, not from {source} "
                         "(an import hook ahead of PYTHONPATH?)")
    if baseline.python is None:
        return baseline
    return Baseline(revision=baseline.revision, commit=baseline.commit, source=source,
                    python=baseline.python, python_version=version)
