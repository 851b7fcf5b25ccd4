"""`python -m train fit|validate ...`: the same commands as `mmar fit|validate` (mmar/cli.py), same flags."""
import sys

from mmar.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] not in ("fit", "validate", "-h", "--help"):
        sys.exit(f"error: python -m train runs fit or validate, got {argv[0]!r} (mmar --help for the other commands)")
    sys.exit(main(argv))
