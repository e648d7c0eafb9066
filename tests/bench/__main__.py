"""`python -m tests.bench`: see `tests.bench.harness`."""

import sys

from tests.bench.harness import main

sys.exit(main())
