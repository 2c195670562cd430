"""GRPOModule end to end on a tiny Llama: on-policy ratio, LLDS registration, batched generation, checkpoints."""

import lightning as L
import pytest
import torch

from callbacks.llds import LLDS
from datamodules.chat_encoding import pad
from recipes.grpo import GRPOModule
from recipes.grpo.rollout import Rollout, rollout_metrics
from tests.conftest import TINY_LM_CONFIG as TINY
from tests.conftest import fit_grpo, grpo_data, grpo_module


class OldPolicyCheck(GRPOModule):
    """Compares the cached old log-probs with a separate forward of the policy that sampled the rollout."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.old_vs_sampler: list[tuple[torch.Tensor, torch.Tensor]] = []

    def mini_batch_loss(self, rollout, idx, stats, forward=None):
        with torch.no_grad():  # before this mini-batch's update: the weights that sampled the rollout (mu = 1)
            sampler, _ = self.completion_logprobs(self.model, *rollout.inputs(idx))
        loss = super().mini_batch_loss(rollout, idx, stats, forward)
        self.old_vs_sampler.append((rollout.old_logp[idx], sampler))
        return loss


def test_mu1_ratio_exactly_one_llds_exactly_zero_and_warns(tmp_path):
    torch.manual_seed(0)
    m = OldPolicyCheck(model_config=TINY, num_generations=4, max_new_tokens=5, mu=1, num_mini_batches=1)
    with pytest.warns(UserWarning, match="LLDS is exactly zero"):
        _, log = fit_grpo(tmp_path, m, [LLDS()], steps=2)
    # the ratio is 1 because the reused first forward gives the sampling policy's log-probs, token for token
    assert len(m.old_vs_sampler) == 2
    for old, sampler in m.old_vs_sampler:
        torch.testing.assert_close(old, sampler, rtol=0, atol=1e-6)
    for step in log.steps:
        assert step["llds/penalty"] == 0.0 and step["loss/llds"] == 0.0
        assert step["grpo/clip_fraction"] == 0.0
        assert {"grpo/reward_mean", "grpo/reward_std", "grpo/accuracy", "grpo/entropy", "grpo/completion_length",
                "grpo/logp_incorrect", "loss/grpo"} <= step.keys()


def test_mu2_updates_off_policy_and_llds_acts(tmp_path):
    torch.manual_seed(0)
    m = grpo_module(mu=2, num_mini_batches=2, optimizer=lambda p: torch.optim.SGD(p, lr=5.0))
    # a reward that always splits each group keeps advantages non-zero, so the policy must move
    m.reward_funcs = [lambda prompts, completions, **c: [float(i % 2) for i in range(len(completions))]]
    trainer, log = fit_grpo(tmp_path, m, [LLDS(gate="token")], steps=4)
    assert trainer.global_step == 4  # one rollout batch = mu * num_mini_batches optimizer steps
    assert log.steps[-1]["grpo/ratio"] != 1.0
    assert log.steps[-1]["llds/penalty"] > 0.0 and log.steps[-1]["llds/gated_fraction"] > 0.0


def test_registered_loss_term_is_added_and_logged(tmp_path):
    torch.manual_seed(0)
    m = grpo_module(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    seen = []

    class Term(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            pl_module.register_loss_term("probe", self.term)

        def term(self, tokens):
            seen.append(tokens)
            return 3.0 + 0.0 * tokens.logp.sum(), {"probe/tokens": tokens.mask.sum()}

    _, log = fit_grpo(tmp_path, m, [Term()], steps=1)
    assert log.steps[0]["loss/probe"] == 3.0
    assert log.steps[0]["train/loss"] == pytest.approx(log.steps[0]["loss/grpo"] + 3.0)
    t = seen[0]
    assert t.logp.requires_grad and not t.old_logp.requires_grad
    assert t.logp.shape == t.mask.shape and t.advantages.shape == (8,)  # 2 prompts x G=4
    assert log.steps[0]["probe/tokens"] == float(t.mask.sum())


def test_one_generate_call_for_all_prompts_and_samples(tmp_path):
    m = grpo_module()
    calls = []

    class Spy(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            original = pl_module.model.generate

            def generate(**kwargs):
                calls.append((kwargs["input_ids"].shape[0], kwargs["use_cache"]))
                return original(**kwargs)

            pl_module.model.generate = generate

    fit_grpo(tmp_path, m, [Spy()], steps=1)
    assert calls == [(8, True)]


def test_bad_reward_stops_run_with_its_name(tmp_path):
    def broken(prompts, completions, **columns):
        return [1.0]

    m = grpo_module()
    m.reward_funcs = [broken]
    with pytest.raises(Exception, match="'broken' returned 1 rewards for 8 completions"):
        fit_grpo(tmp_path / "stopping", m, steps=1)

    def raises(prompts, completions, **columns):
        raise RuntimeError("judge offline")

    m = grpo_module(drop_bad_rewards=True)
    m.reward_funcs = [raises]
    _, log = fit_grpo(tmp_path / "dropping", m, steps=1)
    assert log.steps[0]["grpo/dropped"] == 8.0 and log.steps[0]["loss/grpo"] == 0.0


def test_sft_checkpoint_is_loaded(tmp_path):
    from recipes.causal_lm import CausalLMModule

    sft = CausalLMModule(model_config=TINY, tokenizer_name="char")
    sft.configure_model()
    path = tmp_path / "sft.ckpt"
    torch.save({"state_dict": sft.state_dict(), "hyper_parameters": dict(sft.hparams)}, path)
    m = GRPOModule(sft_checkpoint=str(path), tokenizer_name="char", num_generations=2)
    m.configure_model()
    for (name, a), b in zip(sft.model.state_dict().items(), m.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_sft_warmup_lowers_loss_before_grpo(tmp_path):
    torch.manual_seed(0)
    dm = grpo_data(tmp_path)
    dm.prepare_data()
    dm.setup()
    m = grpo_module(sft_steps=8, sft_lr=3e-3, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    m.tokenizer = dm.tokenizer
    m.configure_model()
    batch = next(iter(dm.sft_dataloader()))
    with torch.no_grad():
        before = float(m.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss)
    fit_grpo(tmp_path, m, steps=1, dm=dm)
    with torch.no_grad():
        after = float(m.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss)
    assert after < before - 0.5


def test_answer_mask_marks_final_answer_span():
    m = GRPOModule(tokenizer_name="char", num_generations=2)
    tok = m.tokenizer
    texts = ["so 3 #### 12", "just 7"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    completion = pad(ids, tok.pad_token_id)
    cmask = pad([[1] * len(i) for i in ids], 0)
    mask = m.answer_mask(completion, cmask, texts)
    assert mask[0].tolist() == [False] * 5 + [True] * 8  # "#### 12" and EOS
    assert mask[1].tolist() == [True] * 7 + [False] * 6  # no marker, one line: the whole completion


def _hand_rollout(m: GRPOModule, prompts: int = 2) -> Rollout:
    """A rollout batch sampled by ``m`` with fixed advantages (no trainer, no verifier)."""
    tok = m.tokenizer
    ids = pad([tok(f"{i}+{i}=", add_special_tokens=False)["input_ids"] for i in range(prompts)], tok.pad_token_id)
    prompt_ids, prompt_mask = ids, (ids != tok.pad_token_id).long()
    g = m.hparams.num_generations
    completion, cmask = m.generate(prompt_ids, prompt_mask, g)
    n = completion.shape[0]
    valid = torch.ones(n, dtype=torch.bool)
    return Rollout(prompt_ids=prompt_ids.repeat_interleave(g, 0), prompt_mask=prompt_mask.repeat_interleave(g, 0),
                   completion=completion, cmask=cmask, rewards=torch.arange(n).float() % 2, correct=valid,
                   valid=valid, advantages=torch.linspace(-1, 1, n), loss_mask=cmask)


def _count_forwards(m: GRPOModule) -> list[int]:
    from recipes.parts.chunked_head import chunked_head_matches

    assert chunked_head_matches(m.model, torch.ones(1, 4, dtype=torch.long))  # its one probe: not counted below
    calls = [0]
    m.model.get_input_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("chunk", [None, 4])
def test_one_update_old_logp_is_the_update_forward(chunk):
    """With one update per rollout, rollout_logprobs fills old_logp from the update's own forward, before any update:
    the rollout can be logged first, the update spends no second forward, and the loss is the same as with one."""
    torch.manual_seed(0)
    m = GRPOModule(model_config=TINY, tokenizer_name="char", num_generations=3, max_new_tokens=5, mu=1,
                   num_mini_batches=1, logprob_chunk_size=chunk)
    m.configure_model()
    rollout = _hand_rollout(m)
    calls = _count_forwards(m)
    forward = m.rollout_logprobs(rollout)
    assert calls[0] == 1 and forward[0].requires_grad and not rollout.old_logp.requires_grad
    assert torch.equal(rollout.old_logp, forward[0].detach())
    assert set(rollout_metrics(rollout)) >= {"grpo/reward_mean", "grpo/logp_correct"}  # logged before the updates
    [idx] = list(m.mini_batches(rollout.n))
    stats = {}
    loss = m.mini_batch_loss(rollout, idx, stats, forward)
    assert calls[0] == 1  # the update reused the forward
    assert stats["grpo/ratio"][0].item() == 1.0 and stats["grpo/clip_fraction"][0].item() == 0.0
    fresh = m.mini_batch_loss(rollout, idx, {})  # the same loss from a forward of its own
    assert calls[0] == 2 and torch.equal(loss, fresh)
    loss.backward()
    assert all(p.grad is not None for p in m.model.parameters() if p.requires_grad)


def test_several_updates_old_logp_is_a_no_grad_pass():
    torch.manual_seed(0)
    m = GRPOModule(model_config=TINY, tokenizer_name="char", num_generations=3, max_new_tokens=5, mu=2,
                   num_mini_batches=2, logprob_batch_size=4)
    m.configure_model()
    rollout = _hand_rollout(m)  # 6 completions: 2 no-grad forwards of 4 and 2
    calls = _count_forwards(m)
    assert m.rollout_logprobs(rollout) is None
    assert calls[0] == 2 and not rollout.old_logp.requires_grad
    with torch.no_grad():
        expected, _ = m.completion_logprobs(m.model, *rollout.inputs(slice(None)))
    torch.testing.assert_close(rollout.old_logp, expected, rtol=0, atol=1e-6)
