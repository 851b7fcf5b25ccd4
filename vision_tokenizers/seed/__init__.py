"""SEED image tokenizer (DESIGN §5), one concern per file:

config.py     SEEDConfig (toy defaults) and real_size_config() (the paper's sizes)
qformer.py    the Causal Q-Former and its BERT-style layer (separate query and text feed-forwards)
heads.py      reconstruction head, generation head and its reverse Q-Former
tokenizer.py  SEEDTokenizer: encoder -> Causal Q-Former -> VQ -> heads (-> diffusion detokenizer)
summary.py    parameter counts of the real-size tokenizer + SEED-LLaMA LM (`python -m vision_tokenizers.seed`)
"""
from .config import SEEDConfig, real_size_config
from .summary import parameter_counts, real_size_summary
from .tokenizer import SEEDOutput, SEEDTokenizer

__all__ = ["SEEDConfig", "SEEDOutput", "SEEDTokenizer", "parameter_counts", "real_size_config", "real_size_summary"]
