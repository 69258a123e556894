import sys

from raytp.bench.cli import main

sys.exit(main())
