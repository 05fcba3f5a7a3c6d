"""Where the tests find the repository, this interpreter's scripts and the launcher."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ELASTIC_RUN = os.path.join(BIN, "elastic-run")
WORKERS = os.path.join(REPO, "tests", "workers")
