import sys

from mace.cli import main

sys.exit(main())
