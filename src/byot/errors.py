"""The one exception type for mistakes a user can make (bad path, bad flag, wrong checkpoint).

The CLI turns it into a single line on stderr and exit code 2; library code raises it instead of
letting a traceback from deep inside torch reach the user.
"""


class ByotError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
