"""`python -m generate.text_to_image`: the same command as `mmar t2i` (mmar/cli.py), same flags."""
import sys

from mmar.cli import run

if __name__ == "__main__":
    sys.exit(run("t2i", sys.argv[1:]))
