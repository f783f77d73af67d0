"""`python -m service.cli` is the `charlstm` command."""

import sys

from . import main

sys.exit(main())
