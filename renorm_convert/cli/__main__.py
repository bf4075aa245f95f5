import sys

from renorm_convert.cli import main

sys.exit(main())
