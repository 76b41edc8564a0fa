import sys

from minielectra.cli import main

sys.exit(main())
