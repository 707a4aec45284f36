"""The one exception type for mistakes a user can make (bad path, bad flag, wrong checkpoint).

The CLI turns it into a single line on stderr and exit code 2; library code raises it instead of
letting a traceback from deep inside torch reach the user.
"""

import errno


class ByotError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


def describe_os_error(e: OSError) -> str:
    """A write error in words a user acts on (the caller names the file): a full disk says so."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device; free some space or choose another --save-folder"
    return str(e.strerror or e)
