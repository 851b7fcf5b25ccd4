import sys

from mmar.cli import main

sys.exit(main())
