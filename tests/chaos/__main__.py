"""`python -m tests.chaos`: see `tests.chaos.harness`."""

import sys

from tests.chaos.harness import main

sys.exit(main())
