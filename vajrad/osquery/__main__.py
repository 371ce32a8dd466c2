import sys

from vajrad.osquery.extension import main

sys.exit(main())
