"""`python -m ctrak_fast.cli ...` (what torchrun runs) is `ctrak ...`."""

import sys

from . import main

sys.exit(main())
