"""``--baseline REV``: the gateway as committed at a git revision, measured beside this one.

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

__all__ = ["Baseline", "resolve", "unpack"]

#: ``git`` and the import check each get this long (an archive of the package is a few hundred KB).
GIT_TIMEOUT_S = 60.0


@frozen
class Baseline:
    """A revision's ``trioproxy`` package, unpacked and checked to be the one a child imports."""

    #: As given on the command line (``HEAD~3``, ``v0.1``, a commit).
    revision: str
    #: The full commit id it names.
    commit: str
    #: The directory holding the unpacked ``trioproxy/``: the baseline gateway's ``PYTHONPATH``.
    source: Path

    @property
    def suffix(self) -> str:
        """Appended to a gateway's label for its baseline twin: ``gateway@1a2b3c4``."""
        return "@" + self.commit[:7]

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
    except FileNotFoundError:
        raise BenchError(f"--baseline needs {argv[0]}, and it is not installed") from None
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


def unpack(revision: str, commit: str, into: Path, *, repo: Path = CHECKOUT) -> Baseline:
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
    baseline = Baseline(revision=revision, commit=commit, source=source)
    probe = _run([sys.executable, "-c", "import trioproxy; print(trioproxy.__file__)"], "the import check",
                 env=baseline.env())
    if probe.returncode:
        lines = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        raise BenchError(f"--baseline: revision {revision}'s trioproxy does not import here: "
                         f"{lines[-1] if lines else f'exit status {probe.returncode}'}")
    imported = Path(probe.stdout.decode().strip()).resolve()
    if not imported.is_relative_to(source.resolve()):
        raise BenchError(f"--baseline: the interpreter imported trioproxy from {imported}, not from {source} "
                         "(an import hook ahead of PYTHONPATH?)")
    return baseline
