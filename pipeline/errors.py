"""Errors a user can act on, each with its own exit code.

Every stage raises one of these with a one-line message naming the file, node or option at
fault and what to do; the CLI prints the message and exits with the code, never a traceback.
"""
from __future__ import annotations


class CrossPruneError(Exception):
    """Base class: a problem with the user's input, not a bug in crossprune."""

    exit_code = 1


class UsageError(CrossPruneError):
    """An option or combination of options that cannot work."""

    exit_code = 2


class ModelError(CrossPruneError):
    """The model file is missing, unreadable, invalid or uses something we cannot convert."""

    exit_code = 3


class DataError(CrossPruneError):
    """The few-shot or evaluation data does not fit the model or the options."""

    exit_code = 4


class NothingToPruneError(CrossPruneError):
    """The graph has no channel group that can be pruned safely."""

    exit_code = 5


class VerificationError(CrossPruneError):
    """The slim model does not reproduce the masked student it came from."""

    exit_code = 6


class GateError(CrossPruneError):
    """A quality gate (accuracy, fidelity, speed) was not met; the report is still written."""

    exit_code = 7


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with --debug output)",
    UsageError.exit_code: "bad option or usage",
    ModelError.exit_code: "the model cannot be read, checked or converted",
    DataError.exit_code: "the data does not fit the model or the options",
    NothingToPruneError.exit_code: "no prunable channel group in the graph",
    VerificationError.exit_code: "the slim model does not match the masked student",
    GateError.exit_code: "a quality gate failed",
    130: "interrupted (no output written)",
    141: "the reader of the output stopped early (a pipe into head)",
}
