"""Exceptions the library raises for bad input; the CLI shows them as ``Error: <message>``."""


class LTError(Exception):
    """Base class: a problem with the user's input or files, with a message that says how to fix it."""


class CheckpointError(LTError):
    """A checkpoint that cannot be loaded as asked."""


class DataError(LTError):
    """A data spec or data file that cannot be used."""


class StoreError(LTError):
    """A result file that cannot be read, written or resumed."""


class ConfigError(LTError):
    """An option value or combination that makes no sense."""


class NumericalError(LTError):
    """A computation that cannot give a trustworthy answer (non-deterministic operator, NaN weights...)."""
