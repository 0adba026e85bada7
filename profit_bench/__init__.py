class UserError(Exception):
    """Bad input a user can fix; CLIs print it on one line and exit 2."""
