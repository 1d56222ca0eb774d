import sys

from vlext.toyworld.cli import main

sys.exit(main())
