"""What our one-line messages quote of others: an exception's first line, a service's answer clipped.

Libraries (pyarrow, PIL, datasets, the hub client, torch's process groups) put what went wrong on
their message's first line and follow it with advice for other tools or a traceback-like tail; a
metadata service may answer a page of HTML. A message of ours quotes the part that says what
happened, folded like every line the user sees (`exitcodes.one_line`) and bounded.
"""

from __future__ import annotations

from tinydist.runtime.exitcodes import one_line

QUOTE_LIMIT = 200  # characters: enough to name the file, the address or the status that failed


def first_line(error: BaseException, *, named: bool = False) -> str:
    """The first line of `error`'s message, folded and cut to QUOTE_LIMIT; its type's name when it says
    nothing. `named`: prefixed with the type's name (`OSError: ...`), for messages that do not say it."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    text = one_line(lines[0])[:QUOTE_LIMIT]
    return f"{type(error).__name__}: {text}" if named else text


def clipped(text: str, limit: int = QUOTE_LIMIT) -> str:
    """All of `text` as one line of at most `limit` characters, `...` marking a cut."""
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
