import sys

from rpat.cli import main

sys.exit(main())
