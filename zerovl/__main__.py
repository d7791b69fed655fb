import sys

from zerovl.cli import main

sys.exit(main())
