"""GRPO rollout engines (``recipes.grpo.engines``): ``paged`` (continuous batching) and ``generate_static`` give
``generate``'s greedy completions token for token (Llama, Qwen2, Gemma 2 with a sliding window shorter than the
sequences, GPT-2), on the policy's own weights, with modes, attention and training
forwards unchanged after, a quiet console, clear errors, and a GRPO fit end to end."""

import logging
from types import SimpleNamespace

import pytest
import torch
import transformers

from recipes.grpo import GRPOModule
from recipes.grpo.engines import ENGINES, check_engine, sample_completions, sampling_settings
from tests.conftest import fit_grpo, grpo_module

_LM = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
       "num_key_value_heads": 1, "num_hidden_layers": 2, "max_position_embeddings": 64,
       "initializer_range": 0.3}  # varied greedy tokens
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**_LM, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**_LM, tie_word_embeddings=False),
    "gemma2": lambda: transformers.Gemma2Config(**_LM, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                                final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                                tie_word_embeddings=False),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_head=2, n_layer=2, n_positions=64,
                                            bos_token_id=1, eos_token_id=1, initializer_range=0.3),
}
PAD = 0


def _model(family: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    return model.train()  # as a policy is during a fit


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of different lengths, left-padded as the GRPO data module pads them."""
    rows = [[5, 9, 12, 3, 7, 30, 2], [11, 4], [8, 21, 6, 17]]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _eos_early(model) -> tuple[SimpleNamespace, int, int]:
    """A tokenizer stand-in whose EOS is an early greedy token of one prompt (the first token of a completion not
    seen before in it), so that completion stops at once while others run on; that prompt and its length."""
    ids, mask = _prompts()
    probe = SimpleNamespace(eos_token_id=63, pad_token_id=PAD)
    completion, _ = sample_completions(model, probe, ids, mask, 1, 8, {"do_sample": False})
    j, r = min((j, r) for r, row in enumerate(completion.tolist()) for j in range(1, len(row))
               if row[j] not in row[:j])
    return SimpleNamespace(eos_token_id=int(completion[r, j]), pad_token_id=PAD), r, j + 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_completions_equal_across_engines(family):
    model = _model(family)
    tok, prompt, length = _eos_early(model)
    ids, mask = _prompts()
    ref, ref_mask = sample_completions(model, tok, ids, mask, 2, 10, {"do_sample": False})
    assert ref_mask[2 * prompt:2 * prompt + 2].sum(1).tolist() == [length, length]  # ends at EOS early
    assert ref_mask.sum(1).max() > length
    for engine in ("generate_static", "paged"):
        completion, cmask = sample_completions(model, tok, ids, mask, 2, 10, {"do_sample": False}, engine=engine)
        assert torch.equal(completion, ref), engine
        assert torch.equal(cmask, ref_mask), engine


def test_paged_runs_on_the_policys_own_weights_and_gives_the_model_back_unchanged():
    model = _model("llama")
    model.model.norm.eval()  # a module in its own mode
    modes = {name: m.training for name, m in model.named_modules()}
    attention = model.config._attn_implementation
    params = {name: p.data_ptr() for name, p in model.named_parameters()}
    batch = torch.randint(1, 64, (2, 6))
    torch.manual_seed(3)
    before = model(input_ids=batch).logits
    seen = []  # the weights the engine's forwards read, and whether they record a graph
    embed = model.get_input_embeddings()
    hook = embed.register_forward_pre_hook(lambda module, args: seen.append((module.weight.data_ptr(),
                                                                             torch.is_grad_enabled())))
    ids, mask = _prompts()
    sample_completions(model, SimpleNamespace(eos_token_id=1, pad_token_id=PAD), ids, mask, 2, 6,
                       sampling_settings(1.0, 0.9), engine="paged")
    hook.remove()
    assert seen and set(seen) == {(params["model.embed_tokens.weight"], False)}  # no copy of the model, no grad
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == params
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.config._attn_implementation == attention
    assert not hasattr(model, "_cached_continuous_batching_manager")  # the KV cache is not kept for the update
    torch.manual_seed(3)
    after = model(input_ids=batch).logits
    assert torch.equal(before, after) and after.requires_grad  # training forwards unchanged, and differentiable
    after.sum().backward()


def test_paged_under_mixed_precision_runs_in_the_weights_dtype():
    """Lightning's autocast is thread-local: the generation thread runs the fp32 weights in fp32 (its KV cache has
    the weights' dtype), so the completions equal those sampled without autocast."""
    model = _model("llama")
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    ids, mask = _prompts()
    tok = SimpleNamespace(eos_token_id=63, pad_token_id=PAD)
    plain, _ = sample_completions(model, tok, ids, mask, 1, 6, {"do_sample": False}, engine="paged")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = sample_completions(model, tok, ids, mask, 1, 6, {"do_sample": False}, engine="paged")
    assert torch.equal(plain, mixed) and set(seen) == {torch.float32}


def test_paged_sampling_keeps_the_contract_and_repeats_under_a_seed(capfd, caplog):
    model = _model("qwen2")
    tok = SimpleNamespace(eos_token_id=3, pad_token_id=PAD)
    ids, mask = _prompts()
    caplog.set_level(logging.INFO)
    # continuous batching's own logger prints to its own console handler: a warning of it during a rollout is quiet
    noise = logging.getLogger("ContinuousBatchingLogger")
    model.lm_head.register_forward_hook(lambda module, args, out: noise.warning("Switching attention"))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(sample_completions(model, tok, ids, mask, 4, 8, sampling_settings(1.0, 0.95), engine="paged"))
    (completion, cmask), (again, _) = outs
    assert completion.shape[0] == 12 and completion.shape[1] <= 8 and torch.equal(completion, again)
    ends = cmask.sum(1)
    for row, n in zip(completion, ends.tolist(), strict=True):
        assert (row[n:] == PAD).all() and (row[:n - 1] != tok.eos_token_id).all()
    assert not [r for r in caplog.records if r.name.startswith("transformers")]  # the console stays clean
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""
    assert noise.level == logging.NOTSET  # its level back after


def test_bad_engine_settings_name_the_argument():
    with pytest.raises(ValueError, match=r"rollout_engine must be one of \('generate', 'generate_static', 'paged'\)"):
        GRPOModule(rollout_engine="vllm")
    with pytest.raises(ValueError, match="rollout_memory_fraction must be in"):
        GRPOModule(rollout_engine="paged", rollout_memory_fraction=1.5)
    assert ENGINES == ("generate", "generate_static", "paged")


def test_paged_without_the_continuous_batching_api_fails_at_configure_time(monkeypatch):
    def old_generate_batch(self, inputs, generation_config=None, progress_bar=True):  # no continuous_batching_config
        return {}

    owner = next(c for c in transformers.GenerationMixin.__mro__ if "generate_batch" in vars(c))
    monkeypatch.delattr(owner, "generate_batch")
    with pytest.raises(RuntimeError, match="needs transformers' continuous batching with generate_batch"):
        GRPOModule(rollout_engine="paged")
    check_engine("generate")  # the default engine needs none of it
    monkeypatch.setattr(transformers.GenerationMixin, "generate_batch", old_generate_batch, raising=False)
    with pytest.raises(RuntimeError, match=r"continuous_batching_config.*transformers 5.17 and later"):
        GRPOModule(rollout_engine="paged")


def test_grpo_fit_with_the_paged_engine(tmp_path):
    torch.manual_seed(0)
    m = grpo_module(rollout_engine="paged")
    trainer, log = fit_grpo(tmp_path, m, steps=2)
    assert trainer.global_step == 2 and len(log.steps) == 2
    assert log.steps[-1]["grpo/completion_length"] > 0
    assert m.model.config._attn_implementation == "sdpa" and m.model.training


def test_rollout_engine_is_not_a_defining_setting():
    from recipes.resume import compare

    saved = {"class_path": "recipes.GRPOModule", "rollout_engine": "generate", "rollout_memory_fraction": 0.5}
    given = {"class_path": "recipes.GRPOModule", "rollout_engine": "paged", "rollout_memory_fraction": 0.3}
    defining, changeable = compare(saved, given, "model")
    assert defining == [] and len(changeable) == 2  # a resume may change them (listed, not refused)


def test_paged_cache_beyond_its_memory_cap_is_a_clear_error():
    model = _model("llama")
    ids, mask = _prompts()
    with pytest.raises(MemoryError, match=r"does not fit in rollout_memory_fraction=1e-06"):
        sample_completions(model, SimpleNamespace(eos_token_id=63, pad_token_id=PAD), ids, mask, 1, 4,
                           {"do_sample": False}, engine="paged", memory_fraction=1e-6)
    assert model.config._attn_implementation == "sdpa" and model.training
