"""The error types moekit raises for bad user input; the CLI prints them as one line."""


class MoekitError(Exception):
    """Base of every error caused by user input (configs, files, checkpoints, arguments)."""


class CheckpointError(MoekitError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the model it claims to hold."""
