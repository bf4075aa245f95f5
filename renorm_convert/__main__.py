"""`python -m renorm_convert ...` runs the command line."""

import sys

from renorm_convert.cli import main

sys.exit(main())
