"""Errors that mean "the input is wrong, here is the fix" (the CLI prints them in one line, exit 2).

Anything else is a bug and keeps its traceback. Each class also derives from the builtin its callers
already expect (KeyError for an unknown name, RuntimeError for a missing device).
"""


class UserError(Exception):
    """A problem with the user's config, data, checkpoint or machine, with a message that says the fix."""


class UnknownName(UserError, KeyError):
    """A dataset, model or other registered name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DeviceUnavailable(UserError, RuntimeError):
    """The config asks for a device this process cannot see."""


class DataProblem(UserError, RuntimeError):
    """A data set on disk is incomplete or malformed."""


class ConfigError(UserError, ValueError):
    """A config problem, with the key that is wrong and what would be right."""
