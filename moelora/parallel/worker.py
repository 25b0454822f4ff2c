"""Entry point of a worker process: `python -m moelora.parallel.worker SPEC_JSON RANK PORT`."""

import sys

from moelora.parallel.launch import worker_entry

if __name__ == "__main__":
    worker_entry(sys.argv[1:])
