"""User-facing errors.

A `ChunkftError` is bad input from the user (a file, a flag, a model spec). The CLI prints its
message on one line and exits with status 2, without a traceback. Internal invariants use
`assert`; an infeasible budget is an answer (see planner.solve), not an error.
"""


class ChunkftError(Exception):
    """Bad user input. The message names the bad value and what would be valid."""
