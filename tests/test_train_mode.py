"""Train/eval modes: which trainable modules are in eval mode, the contexts that give every module its own mode back,
and the run-safety check that stops (or warns about) a run training modules in eval mode."""

import pytest
import torch
from torch import nn

from callbacks.core.modes import dropout_off, eval_mode, trainable_in_eval
from callbacks.run.train_mode import TrainModeCheck, TrainModeError
from recipes.grpo.engines import sample_completions
from recipes.parts.hf_model import enable_activation_checkpointing
from tests.conftest import TinyModule, build_bpe_tokenizer, tiny_loader, tiny_model, trainer


def test_trainable_in_eval_names_trainable_modules_and_their_dropout_not_frozen_parts():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    assert trainable_in_eval(model) == []
    model[2].requires_grad_(False).eval()  # a frozen part kept in eval mode on purpose
    assert trainable_in_eval(model) == []
    model[1].eval()  # dropout directly inside the trainable model
    assert trainable_in_eval(model) == ["1"]
    model.eval()
    assert trainable_in_eval(model) == ["<root>", "0", "1"]


def test_eval_mode_and_dropout_off_give_every_module_its_own_mode_back():
    model = tiny_model("llama", layers=2)
    enable_activation_checkpointing(model)
    model.train()
    model.model.norm.eval()  # a deliberate per-module mode
    before = {n: m.training for n, m in model.named_modules()}
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == before
    with dropout_off(model):
        kept = {n for n, m in model.named_modules() if m.training}
        assert {f"model.layers.{i}" for i in range(2)} <= kept  # checkpointed blocks: checkpointing needs train mode
        assert not any(m.training for m in model.model.layers[0].modules() if m is not model.model.layers[0])
    assert {n: m.training for n, m in model.named_modules()} == before


def test_generation_keeps_every_modules_own_mode():
    tok = build_bpe_tokenizer()
    model = tiny_model("llama", layers=2)
    model.resize_token_embeddings(len(tok))
    model.train()
    model.model.norm.eval()
    before = {n: m.training for n, m in model.named_modules()}
    ids = torch.tensor([tok("The answer is")["input_ids"]])
    sample_completions(model, tok, ids, torch.ones_like(ids), 2, 3, {"do_sample": False})
    assert {n: m.training for n, m in model.named_modules()} == before


class EvalModule(TinyModule):
    def on_fit_start(self):
        self.model.eval()  # as a model fresh from from_pretrained would be


@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")  # Lightning's own notice
def test_train_mode_check_stops_or_warns(tmp_path):
    with pytest.raises(TrainModeError, match=r"trainable module\(s\) are in eval mode .*call \.train\(\)"):
        trainer([TrainModeCheck()], 1, tmp_path).fit(EvalModule("llama", layers=2), tiny_loader("llama", batches=1))
    with pytest.warns(UserWarning, match=r"trainable module\(s\) are in eval mode"):
        trainer([TrainModeCheck(action="warn")], 1, tmp_path).fit(EvalModule("llama", layers=2),
                                                                 tiny_loader("llama", batches=1))
    with pytest.raises(ValueError, match="action must be one of"):
        TrainModeCheck(action="ignore")
