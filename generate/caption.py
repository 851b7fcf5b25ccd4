"""`python -m generate.caption`: the same command as `mmar caption` (mmar/cli.py), same flags."""
import sys

from mmar.cli import run

if __name__ == "__main__":
    sys.exit(run("caption", sys.argv[1:]))
