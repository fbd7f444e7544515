"""The one family of errors a user can act on.

Every error raised for bad input (a spec field, a file, a model name, a missing run, a cluster that is down)
derives from ``UserError``. Its message is one line that names the thing and the fix; the CLI and the pages
print it as is, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or an unusable environment; ``str(err)`` is the whole message for the user."""
