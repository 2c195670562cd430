"""GRPO with chunked log-probs and mini-batched old/reference passes trains exactly like the full computation."""

import pytest
import torch

from tests.conftest import fit_grpo, grpo_data, grpo_module


def _run(tmp_path, **kwargs):
    torch.manual_seed(0)
    m = grpo_module(mu=2, num_mini_batches=2, kl_coef=0.1, optimizer=lambda p: torch.optim.SGD(p, lr=1.0), **kwargs)
    m.reward_funcs = [lambda prompts, completions, **c: [float(i % 2) for i in range(len(completions))]]
    _, log = fit_grpo(tmp_path, m, steps=8, dm=grpo_data(tmp_path))
    return m, log


def test_chunked_and_full_logprobs_give_the_same_training(tmp_path):
    full, full_log = _run(tmp_path / "full", logprob_chunk_size=None)
    chunked, chunked_log = _run(tmp_path / "chunked", logprob_chunk_size=3, logprob_batch_size=3)
    for (name, a), b in zip(full.model.named_parameters(), chunked.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)
    assert len(full_log.steps) == len(chunked_log.steps) == 2
    for a, b in zip(full_log.steps, chunked_log.steps, strict=True):
        for key in ("loss/grpo", "grpo/kl", "grpo/ratio", "grpo/entropy", "grpo/logp_incorrect"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert full_log.steps[-1]["grpo/ratio"] != 1.0  # the old-policy pass really was used


def test_bad_chunk_settings_are_named():
    with pytest.raises(ValueError, match="logprob_chunk_size"):
        grpo_module(logprob_chunk_size=0)
    with pytest.raises(ValueError, match="logprob_batch_size"):
        grpo_module(logprob_batch_size=-2)
