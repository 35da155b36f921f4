"""`python -m bitfleet` is the `bitfleet` command."""
import sys

from bitfleet.cli import main

sys.exit(main())
