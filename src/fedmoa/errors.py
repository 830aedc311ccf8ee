"""User-facing errors.

Every error a user can cause (bad config, model path, data file, reward function,
client update) is a ``FedMOAError`` whose message is one line naming the field or
file. The CLI prints it without a traceback and exits with status 2.
"""

from __future__ import annotations


class FedMOAError(Exception):
    """An error caused by user input; ``str(err)`` is a single, self-explanatory line."""


class ConfigError(FedMOAError):
    """A config value is missing, of the wrong type or out of range (names the field path)."""


class ModelLoadError(FedMOAError):
    """A model path, file or checksum is wrong (names the path)."""


class RewardError(FedMOAError):
    """A reward function failed or returned bad values (names the function and sample)."""


class DataError(FedMOAError):
    """A data file or data source is unusable (names the file or source)."""


def one_line(error: BaseException | str) -> str:
    """A (possibly multi-line) message collapsed to one line, as every user-facing error is."""
    return " ".join(str(error).split()) or "(no message)"
