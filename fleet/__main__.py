"""``python -m fleet``: run the command line, then leave without a last collection.

By the time a command returns, the heap holds pyVmomi's type tables, pydantic's
schemas and whatever the command built (a simulator: every VM and task): hundreds
of thousands of objects that live as long as the process. At exit the interpreter
collects them all once more, which took longer than a short command itself
(about 1 s per ``fleet sim`` on a loaded 2-core machine, 0.2 s frozen). Frozen,
they are skipped; the operating system frees the memory.
"""

import gc
import sys

from fleet.cli import main

code = main()
gc.freeze()
sys.exit(code)
