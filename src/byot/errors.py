"""The one exception type for mistakes a user can make (bad path, bad flag, wrong checkpoint).

The CLI turns it into a single line on stderr and exit code 2; library code raises it instead of
letting a traceback from deep inside torch reach the user.
"""

import errno

# An exit code of its own for a failure of the machine rather than of the options (sysexits' EX_TEMPFAIL):
# a full disk or an I/O error. byot tune and byot sweep retry such a run from its checkpoint.
ENVIRONMENT_EXIT = 75
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


class ByotError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


def describe_os_error(e: OSError) -> str:
    """A write error in words a user acts on (the caller names the file): a full disk says so."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device; free some space or choose another --save-folder"
    return str(e.strerror or e)


def environment_failure(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is the machine's: no space, a quota, an I/O error."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False
