import sys

from robustkd.cli import main

sys.exit(main())
