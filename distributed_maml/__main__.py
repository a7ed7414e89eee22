"""`python -m distributed_maml`: the same as the `distributed-maml` command."""

import sys

from distributed_maml.cli.main import main

sys.exit(main())
