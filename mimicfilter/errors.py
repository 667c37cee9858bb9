"""The one exception type the CLI turns into a one-line message (exit code 2, or 1), and one-line text."""

MAX_ERROR_CHARS = 300


class MimicfilterError(Exception):
    """A user-facing error: bad input, bad options, or an unusable model.

    ``hint`` is a short suggestion of what to do instead; the CLI prints it after the message.
    ``exit_code``: 2 for usage errors; 1 for a run that could not do its work (nothing readable).
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


def one_line(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """Collapse whitespace/newlines and cap the length: error strings go into one table cell or line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
