"""`python -m generate.text_to_video`: the same command as `mmar t2v` (mmar/cli.py), same flags."""
import sys

from mmar.cli import run

if __name__ == "__main__":
    sys.exit(run("t2v", sys.argv[1:]))
