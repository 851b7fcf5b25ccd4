"""`python -m vision_tokenizers.seed [--lm-preset NAME]`: the real-size parameter counts."""
import argparse

from .summary import real_size_summary

ap = argparse.ArgumentParser(description="Build the paper-sized SEED tokenizer and SEED-LLaMA LM on the meta "
                                         "device and print their parameter counts.")
ap.add_argument("--lm-preset", default="vicuna-7b", help="an LMConfig preset (models/config.py)")
real_size_summary(ap.parse_args().lm_preset)
