"""One exception type for every user-facing failure: the CLI prints its message and exits 2."""


class EdgepruneError(Exception):
    """A problem with the user's input or environment, described so they can fix it."""

    def __init__(self, message: str, stage: str | None = None):
        super().__init__(message)
        self.stage = stage

    def __str__(self) -> str:
        msg = super().__str__()
        return f"[{self.stage}] {msg}" if self.stage else msg


def check_at_least(options, stage: str | None = None) -> None:
    """Each (flag, value, least) of a command's numeric options: a value below its least is
    an error naming the flag (a value of None was not given)."""
    for flag, value, least in options:
        if value is not None and value < least:
            raise EdgepruneError(f"{flag} must be at least {least}, got {value}", stage=stage)


def read_json_option(value, flag: str, stage: str | None = None):
    """What a JSON option holds: its text itself when that is inline JSON ('{"fc": 4}'), else
    the file it names (a feedback run's ratios.json)."""
    import json
    from pathlib import Path
    text = str(value)
    inline = text.lstrip().startswith(("{", "["))
    try:
        return json.loads(text if inline else Path(text).read_text())
    except OSError as e:
        raise EdgepruneError(f"{flag} {text}: cannot read it ({e.strerror}); give a JSON file "
                             "or inline JSON such as '{\"layer1.conv1\": 0.5}'",
                             stage=stage) from None
    except ValueError as e:
        raise EdgepruneError(f"{flag} {text}: not valid JSON ({e})", stage=stage) from None
