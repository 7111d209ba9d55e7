"""`python -m ctrak_fast ...` is `ctrak ...`."""

import sys

from .cli import main

sys.exit(main())
