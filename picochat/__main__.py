import sys

from picochat.cli import main

sys.exit(main())
