"""An exception as the short, one-line quote that our own messages end with.

Libraries (pyarrow, PIL, datasets, the hub client, torch's process groups) put what went wrong on
their message's first line and follow it with advice for other tools or a traceback-like tail; a
message of ours quotes that first line, folded like every line the user sees (`exitcodes.one_line`).
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
