"""The error types moekit raises; the CLI prints each as one line.

Exit codes of the ``moekit`` command: 2 for a ``MoekitError`` (bad input: a config value, a
missing or foreign file, a refused destination), 1 for a ``RunError`` (the input was fine but the
run failed: a non-finite loss, a full disk, a write the system refused). Under torchrun every
rank exits with the code and one rank prints the line (see ``MoekitError.speaks``).
"""


class MoekitError(Exception):
    """Base of every error caused by user input (configs, files, checkpoints, arguments)."""

    exit_code = 2
    # Whether this process prints the error: None = only rank 0 of a torchrun launch (every rank
    # met the same error); ``Distributed.together`` sets True on the rank that failed first and
    # False on the ranks failing with it.
    speaks: bool | None = None


class CheckpointError(MoekitError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the model it claims to hold."""


class RunError(MoekitError):
    """A run that started on valid input failed: training diverged, or the file system refused a write."""

    exit_code = 1
