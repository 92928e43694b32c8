"""User-facing errors: each carries a one-line message that names the problem and the fix."""


class MoeconvError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2."""

    def __init__(self, message: str = "") -> None:
        # One line whatever it quotes: file names, tensor names and library messages may hold newlines.
        super().__init__(" ".join(str(message).split()))


class UnsupportedModelError(MoeconvError):
    """The checkpoint's architecture is not one moeconv can convert."""


class CheckpointError(MoeconvError):
    """A checkpoint is missing, truncated, corrupt or inconsistent."""


class RecipeError(MoeconvError):
    """A recipe or CLI setting is invalid."""


class DataError(MoeconvError):
    """Calibration or evaluation text is missing, too short or unreadable."""
