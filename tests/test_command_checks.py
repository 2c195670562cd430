"""The standalone commands check what they promise and own their outputs (issue 23): ``export``, ``restore`` and
``diversity`` refuse bad arguments, foreign or truncated checkpoints and existing outputs with one line naming the
argument or file; ``--config`` paths must exist and ``-c`` is ``--config``."""

from __future__ import annotations

import json
import logging
import shutil

import lightning as L
import pytest
import torch
import transformers
from peft import PeftModel

from datamodules.diversity import write_crc_mix
from datamodules.instruction import InstructionDataModule
from datamodules.tokenizer import build_char_tokenizer
from recipes import CausalLMModule
from recipes.__main__ import main
from recipes.cli import CONFIG_DIR, resolve_config_args
from tests.conftest import TINY_LM_CONFIG, TinyModule

IDS = torch.tensor([[1, 10, 20, 30, 40, 50]])
GPT2_CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}


def fit_checkpoint(module: L.LightningModule, root, data_dir) -> str:
    """One training step of ``module`` on the CRC mix; the checkpoint's path."""
    files = write_crc_mix(data_dir, n_sft=16, n_train=8, n_val=4)
    data = InstructionDataModule(train_file=str(files["sft"]), val_file=str(files["val"]), batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "model.ckpt")
    return str(root / "model.ckpt")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "lora": fit_checkpoint(CausalLMModule(model_config=TINY_LM_CONFIG, lora={"r": 4, "alpha": 8},
                                              warmup_steps=0), root / "lora", root / "data"),
        "gpt2": fit_checkpoint(CausalLMModule(model_config=GPT2_CONFIG, warmup_steps=0), root / "gpt2",
                               root / "data"),
    }


def refusal(capsys, *argv: str) -> str:
    """Run ``python -m recipes <argv>``; it must exit with status 2 and one line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"python -m recipes {argv[0]}: error: "), err
    return err.splitlines()[-1]  # argparse prints its usage lines first; a refusal of ours is this line alone


# ---------------------------------------------------------------------------------------------------------- export
def test_export_refuses_a_folder_holding_an_earlier_export_and_overwrite_clears_it(ckpts, tmp_path, capsys):
    out = tmp_path / "hf"
    main(["export", "--ckpt_path", ckpts["lora"], "--out", str(out), "--keep_adapters"])
    printed = capsys.readouterr().out
    assert f"LoRA adapters in {out}, base model in {out / 'base'}" in printed  # not only the base folder
    assert "is not empty" in refusal(capsys, "export", "--ckpt_path", ckpts["lora"], "--out", str(out))
    main(["export", "--ckpt_path", ckpts["lora"], "--out", str(out), "--overwrite"])
    assert not (out / "adapter_config.json").exists() and not (out / "base").exists()  # the stale LoRA is gone
    module = CausalLMModule.load_from_checkpoint(ckpts["lora"], map_location="cpu", weights_only=False).eval()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not isinstance(loaded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, module(IDS).logits, rtol=1e-4, atol=1e-5)


def test_export_refuses_foreign_truncated_and_missing_checkpoints_naming_them(ckpts, tmp_path, capsys):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(open(ckpts["gpt2"], "rb").read()[:5000])
    line = refusal(capsys, "export", "--ckpt_path", str(truncated), "--out", str(tmp_path / "a"))
    assert str(truncated) in line and "truncated or corrupt" in line
    # a checkpoint of someone else's LightningModule
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    from tests.conftest import tiny_loader
    trainer.fit(TinyModule(layers=2), tiny_loader(batches=1))
    trainer.save_checkpoint(tmp_path / "foreign.ckpt")
    line = refusal(capsys, "export", "--ckpt_path", str(tmp_path / "foreign.ckpt"), "--out", str(tmp_path / "b"))
    assert str(tmp_path / "foreign.ckpt") in line and "does not record its LightningModule class" in line
    # our module's checkpoint whose weights are not of its recorded architecture
    ckpt = torch.load(ckpts["gpt2"], weights_only=False)
    ckpt["hyper_parameters"]["model_config"] = {**GPT2_CONFIG, "n_layer": 3}
    torch.save(ckpt, tmp_path / "mismatch.ckpt")
    line = refusal(capsys, "export", "--ckpt_path", str(tmp_path / "mismatch.ckpt"), "--out", str(tmp_path / "c"))
    assert str(tmp_path / "mismatch.ckpt") in line and "does not load into CausalLMModule" in line
    assert "is not a file" in refusal(capsys, "export", "--ckpt_path", str(tmp_path / "nope.ckpt"))
    (tmp_path / "file").write_text("x")
    line = refusal(capsys, "export", "--ckpt_path", ckpts["gpt2"], "--out", str(tmp_path / "file"))
    assert "--out=" in line and "is an existing file" in line
    assert not any((tmp_path / d).exists() for d in "abc")  # a refused export leaves no folder behind


def test_random_init_gpt2_export_stops_generating_at_its_eos(ckpts, tmp_path):
    out = tmp_path / "hf"
    main(["export", "--ckpt_path", ckpts["gpt2"], "--out", str(out)])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    vocab = model.get_input_embeddings().num_embeddings
    eos = tokenizer.eos_token_id
    assert eos < vocab == len(build_char_tokenizer())  # not GPT-2's 50256
    assert (model.config.eos_token_id, model.config.bos_token_id, model.config.pad_token_id) == \
        (eos, tokenizer.bos_token_id, tokenizer.pad_token_id)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos and generation["pad_token_id"] == tokenizer.pad_token_id
    assert tokenizer.chat_template == build_char_tokenizer().chat_template
    # a model that wants to end: generate() with the folder's settings alone must stop at EOS
    model.lm_head.register_forward_hook(lambda m, i, logits: logits.index_add(
        -1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), 100.0)))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Add: 2+3"}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert answer[0, prompt["input_ids"].shape[1]:].tolist() == [eos]


# --------------------------------------------------------------------------------------------------------- restore
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 64, "num_hidden_layers": 2,
         "vocab_size": 103, "tie_word_embeddings": False}


def save_llama(path, heads: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_attention_heads=heads, num_key_value_heads=heads, **LLAMA)
    transformers.AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return str(path)


def test_restore_checks_configs_and_dtypes_not_only_shapes(tmp_path, capsys):
    four, eight = save_llama(tmp_path / "four", heads=4), save_llama(tmp_path / "eight", heads=8, seed=1)
    line = refusal(capsys, "restore", "--base", eight, "--post", four, "--blocks", "0:1", "--output",
                   str(tmp_path / "o1"))
    assert "different configs" in line and "num_attention_heads: --base 8 vs --post 4" in line
    bf16 = save_llama(tmp_path / "bf16", dtype=torch.bfloat16, seed=2)
    fp32 = save_llama(tmp_path / "fp32", seed=3)
    line = refusal(capsys, "restore", "--base", fp32, "--post", bf16, "--blocks", "0:2", "--output",
                   str(tmp_path / "o2"))
    assert "--base is torch.float32 but --post is torch.bfloat16" in line and "--dtype" in line
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    main(["restore", "--base", fp32, "--post", bf16, "--blocks", "0:2", "--output", str(tmp_path / "o3"),
          "--dtype", "float32"])
    base = transformers.AutoModelForCausalLM.from_pretrained(fp32).state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o3", dtype="auto").state_dict()
    blocks = [k for k in got if ".layers." in k]
    assert len(blocks) == 18 and all(torch.equal(got[k], base[k]) for k in blocks)  # bitwise the base's


def test_restore_owns_its_output(tmp_path, capsys):
    a, b = save_llama(tmp_path / "a"), save_llama(tmp_path / "b", seed=1)
    (tmp_path / "file").write_text("x")
    line = refusal(capsys, "restore", "--base", a, "--post", b, "--blocks", "0:1", "--output", str(tmp_path / "file"))
    assert "--output=" in line and "is an existing file" in line
    assert (tmp_path / "file").read_text() == "x"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.bin").write_text("x")
    line = refusal(capsys, "restore", "--base", a, "--post", b, "--blocks", "0:1", "--output", str(tmp_path / "full"))
    assert "is not empty (holds old.bin)" in line
    main(["restore", "--base", a, "--post", b, "--blocks", "0:1", "--output", str(tmp_path / "full"), "--overwrite"])
    assert not (tmp_path / "full" / "old.bin").exists() and (tmp_path / "full" / "config.json").is_file()
    assert "does not exist" in refusal(capsys, "restore", "--base", str(tmp_path / "missing"), "--post", b,
                                       "--blocks", "0:1", "--output", str(tmp_path / "x"))
    broken = tmp_path / "broken"
    shutil.copytree(a, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    line = refusal(capsys, "restore", "--base", str(broken), "--post", b, "--blocks", "0:1", "--output",
                   str(tmp_path / "z"))
    assert f"--base='{broken}' does not load as a Hugging Face model" in line
    assert "--blocks='0:9' is outside" in refusal(capsys, "restore", "--base", a, "--post", b, "--blocks", "0:9",
                                                  "--output", str(tmp_path / "y"))


# ------------------------------------------------------------------------------------------------------- diversity
@pytest.mark.parametrize(("args", "message"), [
    (["--max_prompts", "0"], "--max_prompts must be >= 1, got 0"),
    (["--max_prompts", "-1"], "--max_prompts must be >= 1, got -1"),
    (["--crc_template", "Random {length}"], "does not say which characters are allowed"),
    (["--crc_template", "Random {length} of {alowed}"], "unknown placeholders ['alowed']"),
    (["--crc_set_sizes", "12"], "--crc_set_sizes must be between 1 and len(--crc_pool) = 9"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
])
def test_diversity_arguments_are_checked_before_loading(args, message, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question": "Random 6 from 13", "answer": "#### 131313"}) + "\n")
    line = refusal(capsys, "diversity", "--model", str(tmp_path / "not_loaded"), "--prompts_file", str(prompts),
                   *args)
    assert message in line



def test_write_crc_data_owns_its_folder(tmp_path, capsys):
    folder = tmp_path / "crc"
    main(["diversity", "--write_crc_data", str(folder)])
    (folder / "notes.txt").write_text("the user's own file")
    line = refusal(capsys, "diversity", "--write_crc_data", str(folder))
    assert "--write_crc_data=" in line and "is not empty" in line
    main(["diversity", "--write_crc_data", str(folder), "--overwrite"])
    assert sorted(p.name for p in folder.iterdir()) == ["sft.jsonl", "train.jsonl", "val.jsonl"]


# ---------------------------------------------------------------------------------------------------------- config
def test_a_config_path_that_does_not_exist_is_an_error_and_c_is_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["fit", "--config", "my_stf/sft.yaml"], ["fit", "-c", "my_stf/sft.yaml"],
                 ["fit", "--config=my_stf/sft.yaml"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert "'my_stf/sft.yaml': no such file" in str(info.value.code)
        assert "only a bare name" in str(info.value.code)
    with pytest.raises(SystemExit, match="'lisa_sfft': no such file; a bare name looks in the packaged recipes"):
        main(["fit", "-c", "lisa_sfft"])
    assert resolve_config_args(["fit", "-c", "lisa_sft"]) == ["fit", "-c", str(CONFIG_DIR / "lisa_sft.yaml")]
    (tmp_path / "my_sft").mkdir()
    shutil.copy(CONFIG_DIR / "sft.yaml", tmp_path / "my_sft" / "sft.yaml")
    assert resolve_config_args(["fit", "-c", "my_sft/sft.yaml"]) == ["fit", "-c", "my_sft/sft.yaml"]


# --------------------------------------------------------------------------------------------------------- console
def test_validating_a_checkpoint_does_not_print_that_weights_only_was_not_set(ckpts, tmp_path, cli_argv, caplog):
    caplog.set_level(logging.INFO)
    main(["validate", "--config", "sft", "--model.init_args.model_config", json.dumps(GPT2_CONFIG),
          "--ckpt_path", ckpts["gpt2"], "--trainer.limit_val_batches", "1", "--wandb", "disabled",
          "--trainer.default_root_dir", str(tmp_path / "runs"), "--eval_root", str(tmp_path / "eval"),
          "--data.init_args.synthetic_dir", str(tmp_path / "syn"), "--data.init_args.synthetic_train_size", "40"])
    assert "Restoring states from the checkpoint" in caplog.text
    assert "weights_only" not in caplog.text
    assert list((tmp_path / "eval").rglob("metrics.csv"))  # --eval_root: the results went there


def test_list_refuses_arguments(capsys):
    assert "list takes no arguments, got ['sft']" in refusal(capsys, "list", "sft")
