"""`python -m dsv4.loader.make_tiny OUT ...`: the make-tiny command without the `dsv4` CLI."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
