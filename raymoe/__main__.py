import sys

from raymoe.cli import main

sys.exit(main())
