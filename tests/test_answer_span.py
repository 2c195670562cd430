"""The answer-span mask from tokenizer offsets equals the one from decoding every prefix, in a bounded number of
decodes per completion (linear time), with the char tokenizer and a byte-level BPE tokenizer."""

import random

import pytest
import torch

from datamodules.tokenizer import build_char_tokenizer
from recipes.grpo.answer_span import answer_mask, answer_start
from tests.conftest import build_bpe_tokenizer

PIECES = ["so", " ", "\n", "####", "12", "7", "the", "é", "</s>", "<|im_end|>", ".", "  ", "ab", "1,000"]


def decode_every_prefix(tokenizer, completion, cmask, texts):
    """The definition: a token is in the span when the decoded text up to it reaches past the answer start."""
    out = torch.zeros_like(cmask, dtype=torch.bool)
    for i, text in enumerate(texts):
        start, n = answer_start(text), int(cmask[i].sum())
        ids = completion[i, :n].tolist()
        for t in range(n):
            if len(tokenizer.decode(ids[:t + 1], skip_special_tokens=True)) > start:
                out[i, t:n] = True
                break
    return out & cmask.bool()


class CountingTokenizer:
    """Wraps a tokenizer, counting ``decode`` calls; ``fast=False`` hides its offsets."""

    def __init__(self, tokenizer, fast=True):
        self.inner, self.decodes, self.is_fast = tokenizer, 0, fast and tokenizer.is_fast

    def decode(self, *args, **kwargs):
        self.decodes += 1
        return self.inner.decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _samples(tok, rng, count):
    for trial in range(count):
        if trial % 2:  # arbitrary sampled ids, often split differently from how the tokenizer would split the text
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 25))]
        else:
            text = "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 12)))
            ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] or [5]
        yield ids + [tok.eos_token_id]


@pytest.mark.parametrize("build", [build_char_tokenizer, build_bpe_tokenizer], ids=["char", "bpe"])
@pytest.mark.parametrize("fast", [True, False], ids=["offsets", "no_offsets"])
def test_equals_decoding_every_prefix(build, fast):
    tok = build()
    rng = random.Random(0)
    rows = list(_samples(tok, rng, 120))
    width = max(map(len, rows))
    completion = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    cmask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    texts = tok.batch_decode(completion, skip_special_tokens=True)
    got = answer_mask(CountingTokenizer(tok, fast), completion, cmask, texts)
    assert torch.equal(got, decode_every_prefix(tok, completion, cmask, texts))
    assert got.any(1).sum() > 60  # most rows have a span, so the comparison is not vacuous


@pytest.mark.parametrize("build", [build_char_tokenizer, build_bpe_tokenizer], ids=["char", "bpe"])
def test_decodes_per_completion_do_not_grow_with_length(build):
    tok = build()
    for words in (20, 200):
        text = " ".join(["so 3 + 4 = 7."] * words) + "\n#### 7"
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        counting = CountingTokenizer(tok)
        mask = answer_mask(counting, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [text])
        assert counting.decodes <= 3, f"{counting.decodes} decodes for {len(ids)} tokens"
        span = tok.decode([i for i, m in zip(ids, mask[0].tolist(), strict=True) if m], skip_special_tokens=True)
        assert span.strip() == "#### 7"
