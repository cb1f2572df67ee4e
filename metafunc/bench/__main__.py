"""``python -m metafunc.bench JOB``: run one benchmark case described by the JSON ``JOB`` in this (fresh) process, as
:func:`metafunc.bench.run_isolated` does; people run ``metafunc bench``."""

import sys

from metafunc.bench.case import worker_main

__all__: list[str] = []

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("python -m metafunc.bench JOB runs one case for `metafunc bench`; run `metafunc bench --help`")
    sys.exit(worker_main(sys.argv[1]))
