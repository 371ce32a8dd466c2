import sys

from vajrad.daemon import main

sys.exit(main())
