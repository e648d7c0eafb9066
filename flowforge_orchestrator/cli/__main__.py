"""`python -m flowforge_orchestrator.cli`, as the console script."""

import sys

from flowforge_orchestrator.cli import main

sys.exit(main())
