"""`python -m evomerge_sdk.cli`: the `evomerge` command without the console script."""

import sys

from . import main

sys.exit(main())
