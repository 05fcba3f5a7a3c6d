"""``python -m checkpoint inspect URL``."""
import sys

from .cli import main

sys.exit(main())
