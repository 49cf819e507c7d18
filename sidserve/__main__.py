import sys

from sidserve.cli import main

sys.exit(main())
