"""`python -m distributed_maml`: the same as the `distributed-maml` command."""

import sys

from distributed_maml.app.cli import main

sys.exit(main())
