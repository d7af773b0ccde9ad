"""python -m serval.advise RESULT_DIR ... (the same as `serval advise ...`)."""
import sys

from serval.advise.cli import main

sys.exit(main())
