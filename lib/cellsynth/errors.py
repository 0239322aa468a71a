"""Error types. Every message is one line per problem naming the key or column, the value
received and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

MAX_PROBLEMS = 10


class CellsynthError(Exception):
    """Root of every error cellsynth raises on purpose."""


def _join(problems: Sequence[str]) -> str:
    shown = list(problems[:MAX_PROBLEMS])
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    return "\n".join(shown)


class ConfigError(CellsynthError, ValueError):
    """Invalid configuration: unknown key, wrong type, value out of range."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(_join(self.problems))


class SchemaError(CellsynthError, ValueError):
    """A table or frame lacks a column or has the wrong type."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(_join(self.problems))


class NotFittedError(CellsynthError, RuntimeError):
    """A model's prediction verb was called before fit()."""


class LakeError(CellsynthError, RuntimeError):
    """A lake table could not be read or written."""


class CommitConflictError(LakeError):
    """A concurrent writer committed first and retrying did not resolve it."""


class StageError(CellsynthError, RuntimeError):
    """A stage could not complete (reconciliation failure, missing upstream table, ...)."""


class ConfigDeprecationWarning(FutureWarning):
    """A config key was renamed; the old name still works for one release.

    A FutureWarning (shown to end users by default), not a DeprecationWarning: the test suite
    turns cellsynth's DeprecationWarning/UserWarning into errors, and configs written for the
    previous release must keep loading there too.
    """
