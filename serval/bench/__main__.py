"""python -m serval.bench serve|throughput ... (the same as `serval bench ...`)."""
import sys

from serval.bench.cli import main

sys.exit(main())
