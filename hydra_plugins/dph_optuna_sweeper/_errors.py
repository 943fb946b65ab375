"""The error of an impossible sweep setting, shown to the user as one line (see ``optuna_sweeper.py``)."""


class SweepConfigError(ValueError):
    """A sweep that cannot start as configured; the message names the key and the fix."""
