"""Corpus captioning metrics, pure Python: BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015),
as the COCO caption evaluation defines them (our own implementation; tests/test_scenes.py checks both
against values computed with pycocoevalcap 1.2's pure-Python scorers).

Text is lower-cased and split into words at anything that is not a letter, digit, hyphen or apostrophe
(the COCO evaluation's Java PTB tokenizer is not used; our captions have no punctuation it would keep).
"""
from __future__ import annotations

import math
import re
from collections import Counter


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9'-]+", text.lower())


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(candidates: list[str], references: list[list[str]], n: int = 4) -> float:
    """Corpus BLEU-n: clipped n-gram precisions summed over the corpus, geometric mean with equal weights,
    times the brevity penalty exp(1 - r / c) when c < r, where r sums each candidate's closest reference
    length (ties: the shorter one). A precision with no match gives 0 (the COCO scorer's 1e-9 floors aside)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    match, total = [0] * n, [0] * n
    c_len = r_len = 0
    for cand, refs in zip(candidates, references):
        c = words(cand)
        rs = [words(r) for r in refs]
        c_len += len(c)
        r_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for k in range(1, n + 1):
            cn = ngrams(c, k)
            best: Counter = Counter()
            for r in rs:
                best |= ngrams(r, k)  # max count of each n-gram over the references
            match[k - 1] += sum(min(v, best[g]) for g, v in cn.items())
            total[k - 1] += max(len(c) - k + 1, 0)
    if c_len == 0 or any(m == 0 for m in match):
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / n
    bp = 1.0 if c_len >= r_len else math.exp(1 - r_len / c_len)
    return bp * math.exp(log_p)


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0,
            per_caption: bool = False):
    """CIDEr-D averaged over the corpus.

    For each n-gram order k: tf-idf vectors (an n-gram's count times log(|I| / df(g))) with df the number of images whose references contain g (at least 1); per reference the
    score is sum_g min(v_c(g), v_r(g)) v_r(g) / (|v_c| |v_r|) times exp(-(l_c - l_r)^2 / (2 sigma^2)) (lengths
    in words); averaged over references and the n orders, times 10. `per_caption`: the list of each caption's
    score (their mean is the corpus figure; document frequencies come from the whole corpus)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        return [] if per_caption else 0.0
    refs_tok = [[words(r) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in refs_tok:
        df.update({g for r in refs for k in range(1, n + 1) for g in ngrams(r, k)})
    log_i = math.log(float(len(candidates)))

    def vec(tokens: list[str]) -> tuple[list[dict], list[float]]:
        vs, norms = [], []
        for k in range(1, n + 1):
            v = {g: c * (log_i - math.log(max(1.0, df[g]))) for g, c in ngrams(tokens, k).items()}
            vs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vs, norms

    scores = []
    for cand, refs in zip(candidates, refs_tok):
        c = words(cand)
        vc, nc = vec(c)
        score = [0.0] * n
        for r in refs:
            vr, nr = vec(r)
            pen = math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(x, vr[k][g]) * vr[k][g] for g, x in vc[k].items() if g in vr[k])
                if nc[k] and nr[k]:
                    score[k] += dot / (nc[k] * nr[k]) * pen
        scores.append(10.0 * sum(score) / n / len(refs))
    return scores if per_caption else sum(scores) / len(scores)
