"""Exceptions shared by every mpidl module.

:class:`MpidlError` is a user-facing error with a message that is complete on
its own (what went wrong, where, how to fix it).  The CLI prints it once, on
rank 0, without a traceback, and every rank exits with status 2.  Library code
raises it only when all ranks raise it together (the error was agreed by a
collective or derives from data every rank shares); a rank-local problem goes
through :meth:`mpidl.comm.GraphComm.agree` first.
"""


class MpidlError(Exception):
    """Bad input or an unusable state, reported without a traceback."""
