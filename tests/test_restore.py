"""Selective Layer Restoration: exactly the chosen blocks are copied, the result loads, bad input is named; the
``restore`` and ``diversity`` commands run end to end on tiny models."""

import json

import lightning as L
import pytest
import torch
import transformers

from datamodules.diversity import crc_prompts, crc_scores, write_crc_mix
from datamodules.tokenizer import build_char_tokenizer
from recipes.__main__ import main
from recipes.commands.diversity import evaluate_crc, sample_completions
from recipes.commands.restore import load_causal_lm, parse_block_range, restore_blocks
from tests.conftest import TINY_LM_CONFIG

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "tie_word_embeddings": False}
CONFIGS = {
    "llama": lambda layers: transformers.LlamaConfig(num_hidden_layers=layers, vocab_size=103, **LLAMA),
    "gpt2": lambda layers: transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, n_positions=64,
                                                   vocab_size=103, bos_token_id=1, eos_token_id=2),
}


def tiny(kind: str = "llama", layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[kind](layers)).eval()


def save(model: torch.nn.Module, path) -> str:
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return str(path)


BLOCK_PREFIX = {"llama": "model.layers", "gpt2": "transformer.h"}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize(("start", "stop"), [(0, 1), (1, 3), (0, 4)])
def test_restore_copies_exactly_the_chosen_blocks(kind, start, stop):
    base, post = tiny(kind, seed=0), tiny(kind, seed=1)
    with torch.no_grad():  # every tensor differs between the two models (zero-initialized biases included)
        for p in base.parameters():
            p.add_(torch.rand_like(p) + 0.1)
    before = {k: v.clone() for k, v in post.state_dict().items()}
    assert restore_blocks(base, post, start, stop) is post
    chosen = tuple(f"{BLOCK_PREFIX[kind]}.{i}." for i in range(start, stop))
    base_state, after = base.state_dict(), post.state_dict()
    assert after.keys() == before.keys()
    copied = [k for k in after if k.startswith(chosen)]
    assert copied and len(copied) < len(after)
    for name, tensor in after.items():
        want = base_state[name] if name.startswith(chosen) else before[name]
        other = before[name] if name.startswith(chosen) else base_state[name]
        assert torch.equal(tensor, want) and not torch.equal(tensor, other), name


def test_restore_command_writes_a_loadable_model(tmp_path, capsys):
    base, post = tiny(seed=0), tiny(seed=1)
    base_dir, post_dir = save(base, tmp_path / "base"), save(post, tmp_path / "post")
    main(["restore", "--base", base_dir, "--post", post_dir, "--blocks", "1:3", "--output", str(tmp_path / "out")])
    assert "restored blocks 1..2 of 4" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    expected = restore_blocks(base, post, 1, 3).state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    assert tokenizer("Random 6 from 13")["input_ids"] == build_char_tokenizer()("Random 6 from 13")["input_ids"]


@pytest.mark.parametrize(("text", "match"), [("3:1", "'3:1' is outside the model's 4 blocks"),
                                             ("0:5", "'0:5' is outside"), ("-1:2", "'-1:2' is outside"),
                                             ("a:b", "'a:b' is not a range"), ("1:2:3", "'1:2:3' is not a range")])
def test_bad_ranges_name_the_argument(text, match):
    with pytest.raises(ValueError, match=f"--blocks={match}"):
        parse_block_range(text, 4)
    assert parse_block_range("2", 4) == (2, 3)


def test_mismatched_architectures_are_named(tmp_path):
    with pytest.raises(ValueError, match="--base has 4 blocks but --post has 3"):
        restore_blocks(tiny(layers=4), tiny(layers=3), 0, 1)
    wide = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        num_hidden_layers=4, vocab_size=103, **{**LLAMA, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"differ in shape .*mlp.*\(64, 32\) vs --post \(96, 32\)"):
        restore_blocks(tiny(), wide, 0, 1)
    with pytest.raises(ValueError, match="different tensors"):
        restore_blocks(tiny("llama"), tiny("gpt2"), 0, 1)
    with pytest.raises(ValueError, match="--base='missing' does not exist"):
        load_causal_lm("missing", what="--base")
    tiny().save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="--post='.*no_tokenizer' holds no tokenizer files; pass --tokenizer"):
        load_causal_lm(str(tmp_path / "no_tokenizer"), what="--post")
    base_dir = save(tiny(), tmp_path / "b")
    with pytest.raises(SystemExit):  # one line naming --blocks (tests/test_command_checks.py)
        main(["restore", "--base", base_dir, "--post", base_dir, "--blocks", "2:9", "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def _fit(module, datamodule, root):
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root)
    trainer.fit(module, datamodule=datamodule)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_restore_from_lightning_checkpoints(tmp_path):
    from datamodules.instruction import InstructionDataModule
    from datamodules.verifiable_qa import VerifiableQADataModule
    from recipes.causal_lm import CausalLMModule
    from recipes.grpo import GRPOModule

    files = write_crc_mix(tmp_path / "data", n_sft=32, n_train=16, n_val=4)
    config = {**TINY_LM_CONFIG, "num_hidden_layers": 3}
    sft = _fit(CausalLMModule(model_config=config, warmup_steps=0),
               InstructionDataModule(train_file=str(files["sft"]), val_file=str(files["val"]), batch_size=4),
               tmp_path / "sft")
    grpo = _fit(GRPOModule(sft_checkpoint=sft, num_generations=2, max_new_tokens=4),
                VerifiableQADataModule(train_file=str(files["train"]), val_file=str(files["val"]), batch_size=2),
                tmp_path / "grpo")
    main(["restore", "--base", sft, "--post", grpo, "--blocks", "2:3", "--output", str(tmp_path / "out")])
    base, _ = load_causal_lm(sft)
    post, _ = load_causal_lm(grpo)
    out, tokenizer = load_causal_lm(str(tmp_path / "out"))
    assert len(tokenizer) == len(build_char_tokenizer())
    expected = restore_blocks(base, post, 2, 3).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in out.state_dict().items())


def test_diversity_command_end_to_end(tmp_path, capsys):
    model_dir = save(tiny(), tmp_path / "m")
    files = write_crc_mix(tmp_path / "data", n_sft=8, n_train=8, n_val=4)
    out = tmp_path / "div.jsonl"
    main(["diversity", "--model", model_dir, "--crc_prompts", "3", "--samples", "4", "--prompts_file",
          str(files["val"]), "--max_prompts", "2", "--max_new_tokens", "5", "--output", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    for key in ("crc/validity", "crc/entropy", "crc/distinct", "crc/valid_distinct", "task/reward", "task/unique",
                "task/distinct_1", "task/distinct_2"):
        assert 0.0 <= printed[key] <= 1.0, key
    assert printed["crc/distinct"] > 0.5  # a random-init model samples varied strings
    with pytest.raises(SystemExit):
        main(["diversity", "--model", model_dir, "--samples", "0"])
    assert "--samples must be >= 1, got 0" in capsys.readouterr().err


def test_crc_evaluation_averages_the_per_prompt_scores():
    model, tokenizer = tiny(), build_char_tokenizer()
    torch.manual_seed(5)
    got = evaluate_crc(model, tokenizer, num_prompts=3, k=4, seed=2, max_new_tokens=4)
    torch.manual_seed(5)
    requests = crc_prompts(3, 2)
    groups = sample_completions(model, tokenizer, [r.text() for r in requests], 4, max_new_tokens=4)
    scores = [crc_scores([t for t, _ in g], r.allowed) for r, g in zip(requests, groups, strict=True)]
    assert got["crc/distinct"] == pytest.approx(sum(s["distinct"] for s in scores) / 3)
    assert got["crc/validity"] == pytest.approx(sum(s["validity"] for s in scores) / 3)


@pytest.mark.slow
def test_restoration_sweep_quick(tmp_path, capsys, monkeypatch):
    import importlib.util

    from recipes.cli import CONFIG_DIR

    spec = importlib.util.spec_from_file_location("restoration_sweep",
                                                  CONFIG_DIR.parents[1] / "benchmarks" / "restoration_sweep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.chdir(tmp_path)
    summary = bench.main(["--quick", "--out_dir", str(tmp_path)])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    models = ["sft", "grpo", "0:1", "1:2", "0:2"]  # the quick model has 2 blocks
    assert [row["model"] for row in lines[:-1]] == models and lines[-1] == summary
    assert list(summary["models"]) == models and "validity" in summary["models"]["sft"]
    assert json.loads((tmp_path / "restoration_sweep_rows.json").read_text()) == lines[:-1]
    assert (tmp_path / "restoration_sweep.png").stat().st_size > 0
