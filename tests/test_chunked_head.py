"""Chunked log-probs / entropy / cross-entropy equal the full-vocabulary computation, values and gradients."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from recipes.grpo.loss import token_entropy, token_logprobs
from recipes.parts.chunked_head import chunked_cross_entropy, chunked_token_logprobs, last_hidden_state, split_lm
from tests.conftest import TINY_LM_CONFIG


def _tiny_lm(vocab: int = 97, seed: int = 0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_token_logprobs_and_entropy_match_full_logits(chunk):
    model = _tiny_lm()
    ids = torch.randint(0, 97, (3, 11))
    targets = torch.randint(0, 97, (3, 11))
    weights = torch.randn(3, 11)

    full = model(input_ids=ids).logits
    ref = token_logprobs(full, targets, temperature=0.7)
    (ref * weights).sum().backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    _, head = split_lm(model)
    logp, ent = chunked_token_logprobs(last_hidden_state(model, input_ids=ids), head, targets, 0.7, chunk,
                                       entropy=True)
    (logp * weights).sum().backward()
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, token_entropy(full.detach(), 0.7), atol=1e-5, rtol=0)
    assert not ent.requires_grad
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys() and "lm_head.weight" in grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_no_grad_pass_builds_no_graph():
    model = _tiny_lm()
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        logp, ent = chunked_token_logprobs(last_hidden_state(model, input_ids=ids), split_lm(model)[1], ids, 1.0, 3)
    assert not logp.requires_grad and ent is None


@pytest.mark.parametrize("chunk", [5, 4096])
def test_cross_entropy_matches_hf_loss(chunk):
    model = _tiny_lm()
    ids = torch.randint(0, 97, (2, 13))
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt
    labels[1, 10:] = -100  # padding
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = chunked_cross_entropy(last_hidden_state(model, input_ids=ids)[:, :-1], split_lm(model)[1], labels[:, 1:],
                                 chunk)
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_bad_arguments_are_named():
    model = _tiny_lm()
    h = torch.zeros(2, 3, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(h, model.lm_head, torch.zeros(2, 3, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="do not align"):
        chunked_token_logprobs(h, model.lm_head, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder and an output head"):
        split_lm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("lora", [False, True])
def test_sft_module_chunked_loss_equals_plain_loss(lora, tmp_path):
    from datamodules.instruction import InstructionDataModule
    from recipes.causal_lm import CausalLMModule, LoraSettings

    dm = InstructionDataModule(synthetic_dir=str(tmp_path), synthetic_train_size=16, batch_size=4)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    tiny = TINY_LM_CONFIG
    losses, grads = [], []
    for chunk in (None, 5):
        torch.manual_seed(0)
        module = CausalLMModule(model_config=tiny, tokenizer_name="char", loss_chunk_size=chunk,
                                lora=LoraSettings(r=2) if lora else None)
        module.configure_model()
        loss = module.lm_loss(batch)
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any("lora" in n for n in grads[0]) == lora
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="loss_chunk_size"):
        CausalLMModule(model_config=tiny, tokenizer_name="char", loss_chunk_size=0)


# ------------------------------------------------------------------------------------------------------------------
# The chunked path checks the model, not a list: families whose logits are not head(hidden) get the plain path.
TRANSFORMED = {  # tiny random-init models whose logits transform head(hidden); built locally, no download
    "granite": {**TINY_LM_CONFIG, "model_type": "granite", "logits_scaling": 4.0},
    "gemma2": {**TINY_LM_CONFIG, "model_type": "gemma2", "head_dim": 16, "final_logit_softcapping": 0.5},
}
PLAIN = {"llama": {**TINY_LM_CONFIG}, "qwen2": {**TINY_LM_CONFIG, "model_type": "qwen2"}}


def _hf_model(config: dict, vocab: int = 97, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    cfg = dict(config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), vocab_size=vocab, **cfg)
                                            ).to(dtype)


def _rollout(vocab: int = 97):
    g = torch.Generator().manual_seed(1)
    prompt, completion = torch.randint(0, vocab, (3, 6), generator=g), torch.randint(0, vocab, (3, 7), generator=g)
    prompt_mask, cmask = torch.ones_like(prompt), torch.ones_like(completion)
    prompt_mask[1, :2] = 0  # a left-padded prompt
    cmask[2, 5:] = 0  # a completion that stopped early
    return prompt, prompt_mask, completion, cmask


def _plain_logprobs(model, prompt, prompt_mask, completion, cmask, temperature):
    """log_softmax of the model's own full logits, gathered at the completion tokens."""
    mask = torch.cat([prompt_mask, cmask], 1)
    logits = model(input_ids=torch.cat([prompt, completion], 1), attention_mask=mask,
                   position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, prompt.shape[1] - 1:-1]
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def sft_batch(tmp_path_factory):
    from datamodules.instruction import InstructionDataModule

    dm = InstructionDataModule(synthetic_dir=str(tmp_path_factory.mktemp("sft")), synthetic_train_size=8,
                               batch_size=4)
    dm.prepare_data()
    dm.setup()
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("family", sorted(TRANSFORMED))
def test_sft_loss_of_a_transforming_model_is_its_own_loss(family, sft_batch):
    from recipes.causal_lm import CausalLMModule

    module = CausalLMModule(model_config=TRANSFORMED[family], tokenizer_name="char", loss_chunk_size=5)
    module.configure_model()
    batch = sft_batch
    own = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    with pytest.warns(UserWarning, match="transforms its logits"):
        loss = module.lm_loss(batch)
    torch.testing.assert_close(loss, own, atol=1e-5, rtol=0)
    torch.testing.assert_close(module.lm_loss(batch), own, atol=1e-5, rtol=0)  # decided once: no second warning


@pytest.mark.parametrize("family", sorted(TRANSFORMED))
def test_grpo_logprobs_of_a_transforming_model_are_a_log_softmax_of_its_logits(family):
    from recipes.grpo.logprobs import completion_logprobs

    model = _hf_model(TRANSFORMED[family])
    rollout = _rollout()
    expected = _plain_logprobs(model, *rollout, temperature=0.7)
    with pytest.warns(UserWarning, match="transforms its logits"):
        logp, ent = completion_logprobs(model, *rollout, temperature=0.7, chunk_size=3, entropy=True)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)
    assert ent is not None and ent.shape == expected.shape


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("qwen2", torch.float32),
                                          ("llama", torch.bfloat16)])
def test_plain_families_keep_the_chunked_path(family, dtype, sft_batch):
    from recipes.grpo.logprobs import completion_logprobs

    model = _hf_model(PLAIN[family], dtype=dtype)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))  # the model's own full forward
    rollout = _rollout()
    for _ in range(2):
        logp, _ = completion_logprobs(model, *rollout, temperature=0.7, chunk_size=3)
    assert len(calls) <= 1, "only the one probe may run the full forward: the chunked path was not kept"
    if dtype == torch.float32:
        torch.testing.assert_close(logp, _plain_logprobs(model, *rollout, temperature=0.7), atol=1e-5, rtol=0)


def test_sft_module_of_a_plain_family_keeps_the_chunked_loss(sft_batch):
    from recipes.causal_lm import CausalLMModule

    module = CausalLMModule(model_config=PLAIN["qwen2"], tokenizer_name="char", loss_chunk_size=5)
    module.configure_model()
    calls = []
    module.model.register_forward_pre_hook(lambda m, args: calls.append(1))
    module.lm_loss(sft_batch)
    module.lm_loss(sft_batch)
    assert len(calls) <= 1  # the probe at most: the loss itself is chunked


def test_the_probe_restores_modes_and_copies_keep_the_verdict():
    import copy

    from recipes.parts.chunked_head import chunked_head_matches

    model = _hf_model(TRANSFORMED["granite"]).train()
    model.model.layers[0].eval()  # a mode the user chose stays as it was
    before = {name: m.training for name, m in model.named_modules()}
    ids = torch.randint(0, 97, (2, 9))
    with pytest.warns(UserWarning, match="GraniteForCausalLM transforms its logits"):
        assert chunked_head_matches(model, ids) is False
    assert {name: m.training for name, m in model.named_modules()} == before
    assert chunked_head_matches(copy.deepcopy(model), ids) is False  # GRPO's reference copy: no second probe
