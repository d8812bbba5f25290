"""Development-time helpers shared by tests/ and bench/ (not part of the shipped package).

Both the test suite and the benchmark start real processes and stop them by PID; the code
that does it lives here, so neither depends on the other.
"""
