"""User-facing errors: the CLI prints ``str(err)`` on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a file, key or value at fault and what was expected)."""


class ConfigError(UserError):
    """An unknown key, a wrong type or a value outside what is allowed in the config."""


class DataError(UserError):
    """A data set on disk that cannot be read: missing, empty, corrupt, bad label."""


class WeightsError(UserError):
    """A weights file that cannot be loaded or does not match the model."""
