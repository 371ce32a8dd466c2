import sys

from .extension import main

sys.exit(main())
