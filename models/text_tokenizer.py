"""Text tokenizer: a `tokenizers.Tokenizer` plus this project's special tokens (DESIGN §3).

Text ids come first, then the special tokens, then (in the LM vocabulary, see models/vocab.py)
the visual code ranges. Any Hugging Face `tokenizer.json` loads; a small byte-level BPE can be
trained on a caption corpus for the toy demos.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# <t2i> / <i2t> open a sample and name its task (models/sequence.py), so a caption-dropped
# text->image sample never looks like the start of an image->text one.
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<boi>", "<eoi>", "<t2i>", "<i2t>")


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(missing)  # appended after the existing ids
        self.tok = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id, self.eos_id, self.pad_id = ids["<bos>"], ids["<eos>"], ids["<pad>"]
        self.boi_id, self.eoi_id = ids["<boi>"], ids["<eoi>"]
        self.t2i_id, self.i2t_id = ids["<t2i>"], ids["<i2t>"]
        self.special_ids = sorted(ids.values())

    @property
    def vocab_size(self) -> int:
        """Number of ids the text side uses (text + specials)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True).strip()

    def to_json(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        return cls(Tokenizer.from_str(text))

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None

    @classmethod
    def train_bpe(cls, corpus: Iterable[str], vocab_size: int = 512) -> "TextTokenizer":
        """Byte-level BPE, so any caption is encodable; specials are added after the learned ids."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator(corpus, trainer)  # streamed: a large caption corpus is never held as a list
        return cls(tok)
