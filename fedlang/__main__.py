"""`python -m fedlang` is the `fedlang` command."""

import sys

from fedlang.cli import main

sys.exit(main())
