"""`python -m serval.router --config FILE`: the same as `serval route --config FILE` (and, like it, no torch)."""
import sys

from serval.cli import main

sys.exit(main(["route", *sys.argv[1:]]))
