"""`python -m dsanet`: see dsanet.cli."""

import sys

from dsanet.cli import main

sys.exit(main())
