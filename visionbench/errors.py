"""User-facing errors: the CLI prints ``str(err)`` on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a file, key or value at fault and what was expected)."""


class ConfigError(UserError):
    """An unknown key, a wrong type or a value outside what is allowed in the config."""


class DataError(UserError):
    """A data set on disk that cannot be read: missing, empty, corrupt, bad label."""


class WeightsError(UserError):
    """A weights file that cannot be loaded or does not match the model."""


def one_line(err: BaseException) -> str:
    """The user-facing line of an error. Errors re-raised from DataLoader workers carry the
    worker's traceback in their message; its last line holds the original message."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    for cls in ("DataError", "ConfigError", "WeightsError", "UserError"):
        marker = f"visionbench.errors.{cls}: "
        if marker in last:
            return last.split(marker, 1)[1]
    return lines[0] if len(lines) == 1 else last
