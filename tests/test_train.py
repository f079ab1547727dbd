"""train on a tiny in-process model: each method, the saved folder in predict, shuffling, bad data."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import assert_valid_submission, write_test_csv

from prompt_recovery import model as model_lib
from prompt_recovery.adapters import from_peft
from prompt_recovery.cli import main
from prompt_recovery.config import ModelArgs, TrainArgs
from prompt_recovery.data import InputError
from prompt_recovery.engine import Engine, Request
from prompt_recovery.prompt import PromptBuilder, Template
from prompt_recovery.train import train

PROMPTS = ["Make this formal.", "Turn this into a poem.", "Write it as a pirate.", "Summarise the text.",
           "Make it sound casual.", "Rewrite it for a child.", "Shorten this.", "Make it dramatic."]


def write_train(path, n=8, drop=None, blank_prompt=False):
    cols = ["id", "original_text", "rewritten_text", "rewrite_prompt"]
    if drop:
        cols.remove(drop)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for k in range(n):
            row = {"id": f"r{k}", "original_text": f"The quick brown fox number {k}.",
                   "rewritten_text": f"Hello world, fox {k}!", "rewrite_prompt": "" if blank_prompt and k == 1
                   else PROMPTS[k % len(PROMPTS)]}
            w.writerow([row[c] for c in cols])
    return str(path)


def args_for(tmp_path, model_dir, method="prompt-tuning", **kw):
    base = dict(train_csv=write_train(tmp_path / "train.csv"), output=str(tmp_path / "adapter"), method=method,
                max_steps=2, batch_size=2, num_virtual_tokens=4, lora_r=4, progress=False,
                model=ModelArgs(model=model_dir, adapter="none"))
    base.update(kw)
    return TrainArgs(**base)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "lora"])
def test_each_method_trains_and_predict_loads_the_same_model(method, tiny_model_dir, tmp_path, capsys):
    args = args_for(tmp_path, tiny_model_dir, method, val=write_train(tmp_path / "val.csv", n=4))
    result = train(args)
    s = result.summary
    assert s["steps"] == 2 and math.isfinite(s["train_loss"])
    out = tmp_path / "adapter"
    for name in ("adapter_config.json", "recovery_template.json", "base_model.json", "train_args.json",
                 "train_log.json", "loss.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "train_log.json").read_text())["log_history"]

    loaded = model_lib.load(ModelArgs(model=tiny_model_dir, adapter=str(out), merge_lora=False))
    tok = loaded.tokenizer
    ids = PromptBuilder(tok, Template.load(str(out)), 256).build("Some text.", "Other text!")
    # What predict serves from the folder is what training held in memory, served the same way.
    from_disk = Engine(loaded.model, tok.pad_token_id, [tok.eos_token_id], 6, served=loaded.served)
    model, served, name = from_peft(result.model)
    in_memory = Engine(model, tok.pad_token_id, [tok.eos_token_id], 6, served=served)
    got = from_disk.run([Request(ids, adapter=loaded.adapter_names[0])])
    assert got.tokens == in_memory.generate([Request(ids, adapter=name)])
    if method == "prompt-tuning":  # the 4 virtual tokens really are in the prompt the model reads
        assert from_disk.length(Request(ids, adapter=loaded.adapter_names[0])) == len(ids) + 4

    ids_csv = write_test_csv(tmp_path / "t.csv", n=3)
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(tmp_path / "s.csv"), "--model", tiny_model_dir,
                 "--adapter", str(out), "--no-progress", "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err
    assert_valid_submission(tmp_path / "s.csv", ids_csv)


def test_loss_is_on_the_prompt_tokens_only(tiny_model_dir):
    from conftest import make_tokenizer

    from prompt_recovery.train import RecoveryDataset

    tok = make_tokenizer()
    builder = PromptBuilder(tok, Template(answer_prefix=""), 256)
    ds = RecoveryDataset([("Original words.", "Rewritten words.", "Make it formal.")], builder, tok.eos_token_id)
    item = ds[0]
    labelled = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
    assert tok.decode(labelled) == " Make it formal.<eos>"
    assert len(item["labels"]) == len(item["input_ids"])


def test_the_collator_pads_on_the_right_with_ignored_labels_whatever_side_the_tokenizer_pads():
    from conftest import make_tokenizer

    from prompt_recovery.train import Collator, RecoveryDataset

    tok = make_tokenizer()
    assert tok.padding_side == "left"  # as generation sets it
    builder = PromptBuilder(tok, Template(answer_prefix=""), 256)
    rows = [("Short.", "Tiny.", "Make it formal."), ("A much longer original text, with more words in it.",
                                                     "And a longer rewritten text too!", "Write it as a pirate.")]
    ds = RecoveryDataset(rows, builder, tok.eos_token_id)
    collator = Collator(tok)
    batch = collator([ds[1], ds[0]])
    width = batch["input_ids"].shape[1]
    for n, item in enumerate([ds[1], ds[0]]):
        k = len(item["input_ids"])
        assert batch["input_ids"][n, :k].tolist() == item["input_ids"]
        assert batch["labels"][n, :k].tolist() == item["labels"]
        assert batch["input_ids"][n, k:].eq(tok.pad_token_id).all() and batch["labels"][n, k:].eq(-100).all()
        assert batch["attention_mask"][n].tolist() == [1] * k + [0] * (width - k)
    assert collator.seen == [1, 0] and tok.padding_side == "left"  # the shared tokenizer is left as it was


def test_epochs_are_reshuffled_and_the_seed_repeats_them(tiny_model_dir, tmp_path):
    def order(seed, sub):
        (tmp_path / sub).mkdir()
        return train(args_for(tmp_path / sub, tiny_model_dir, max_steps=0, epochs=2, seed=seed)).order

    a, b, c = order(1, "a"), order(1, "b"), order(2, "c")
    assert len(a) == 16 and sorted(a[:8]) == sorted(a[8:]) == list(range(8))
    assert a[:8] != a[8:]  # the second epoch sees the rows in another order
    assert a == b  # the same seed gives the same orders
    assert a != c


@pytest.mark.parametrize("kind, message", [
    ("missing", "no 'rewrite_prompt' column"),
    ("blank", "empty text or prompt"),
    ("one", "at least 2"),
])
def test_bad_training_data_is_a_clear_error(tiny_model_dir, tmp_path, capsys, kind, message):
    if kind == "missing":
        path = write_train(tmp_path / "t.csv", drop="rewrite_prompt")
    elif kind == "blank":
        path = write_train(tmp_path / "t.csv", blank_prompt=True)
    else:
        path = write_train(tmp_path / "t.csv", n=1)
    with pytest.raises(InputError, match=message):
        train(args_for(tmp_path, tiny_model_dir, train_csv=path))
    code = main(["train", path, "-o", str(tmp_path / "ad"), "--model", tiny_model_dir, "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_on_the_cpu_and_its_adapter_serves_on_the_quantized_base(bits, tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    from prompt_recovery import model as model_lib

    quantized = ModelArgs(model=tiny_model_dir, adapter="none", quantize=bits, device="cpu")
    result = train(args_for(tmp_path, tiny_model_dir, "lora", model=quantized, max_steps=2))
    assert result.summary["steps"] == 2
    loaded = model_lib.load(ModelArgs(model=tiny_model_dir, quantize=bits, device="cpu",
                                      adapter=[str(tmp_path / "adapter")]))
    layer = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, layer) for m in loaded.model.modules())
    assert hasattr(loaded.model, "peft_config")  # never merged into quantized weights


def test_resume_continues_from_the_last_checkpoint(tiny_model_dir, tmp_path):
    first = train(args_for(tmp_path, tiny_model_dir, max_steps=2, keep_checkpoints=True))
    assert first.summary["steps"] == 2
    again = train(args_for(tmp_path, tiny_model_dir, max_steps=4, resume=True))
    # Only the two missing steps ran: the batches seen are those of steps 3 and 4.
    assert again.summary["steps"] == 4 and len(again.order) == 4


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "prefix-tuning"])
def test_target_loss_equals_the_models_own_loss(method):
    """The loss on answer positions only (logits projected there alone) is the model's full loss, to rounding,
    for right-padded rows of different lengths and for methods that prepend virtual tokens."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from prompt_recovery.train import _virtual_tokens, target_loss

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    cfg = {"lora": LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj", "v_proj"]),
           "prompt-tuning": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
           "prefix-tuning": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)}[method]
    model = get_peft_model(base, cfg)
    ids = torch.randint(3, 50, (3, 12))
    labels = ids.clone()
    labels[:, :7] = -100
    labels[1, 4:7] = ids[1, 4:7]  # a row whose answer starts earlier (never at 0: the prompt comes first)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    labels[2, 9:] = -100
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    expected = model(**inputs).loss
    got = target_loss(model, inputs, _virtual_tokens(model))
    assert _virtual_tokens(model) == (3 if method == "prompt-tuning" else 0)
    assert torch.allclose(got, expected, atol=1e-5), (float(got), float(expected))


def save_llama3_style(folder) -> str:
    """A tiny Llama whose tokenizer has BOS and EOS but neither pad nor unk (Llama 3's case), "<pad>" nowhere."""
    from conftest import CORPUS, make_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    assert tok.pad_token is None and tok.unk_token is None and "<pad>" not in tok.get_vocab()
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_lora_on_a_tokenizer_without_pad_or_unk_loads_wherever_train_ran(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    save_llama3_style(tmp_path / "base")
    monkeypatch.chdir(tmp_path)  # train and predict run beside the base, which they name "base"
    assert main(["train", write_train(tmp_path / "train.csv"), "--method", "lora", "-o", "ad", "--model", "base",
                 "--max-steps", "2", "--batch-size", "2", "--lora-r", "4", "--no-progress"]) == 0
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "embed_tokens" in k or "lm_head" in k]  # noqa: SIM118
    ids = write_test_csv(tmp_path / "t.csv", n=3)
    code = main(["predict", "t.csv", "-o", "s.csv", "--model", "base", "--adapter", "ad", "--no-progress",
                 "--max-new-tokens", "4", "--report", "r.json"])
    assert code == 0, capsys.readouterr().err
    assert_valid_submission(tmp_path / "s.csv", ids)
    assert json.loads((tmp_path / "r.json").read_text())["fallback_reasons"].get("input") is None


def test_an_adapter_saved_with_grown_embeddings_still_loads_and_generates(tmp_path, capsys):
    """What train wrote before BOS padded such tokenizers: a pad row added, embed_tokens and lm_head saved."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = save_llama3_style(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    tok.add_special_tokens({"pad_token": "<pad>"})
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "old"), save_embedding_layers=True)
    write_test_csv(tmp_path / "t.csv", n=3)
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(tmp_path / "s.csv"), "--model", base, "--adapter",
                 str(tmp_path / "old"), "--no-progress", "--max-new-tokens", "4", "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["generated"] == 3


def test_a_lora_that_does_not_fit_is_refused_with_its_whole_cause_and_a_report(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    train(args_for(tmp_path, tiny_model_dir, "lora"))
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(path))
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])  # a rank that is not the config's
    save_file(weights, str(path))
    ids = write_test_csv(tmp_path / "t.csv", n=3)
    report = tmp_path / "r.json"
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(tmp_path / "s.csv"), "--model", tiny_model_dir,
                 "--adapter", str(tmp_path / "adapter"), "--no-progress", "--report", str(report)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    line = next(x for x in err if "does not fit" in x)
    assert "size mismatch" in line  # the cause, not only torch's first line
    assert_valid_submission(tmp_path / "s.csv", ids)
    rep = json.loads(report.read_text())
    assert "size mismatch" in rep["error"] and rep["fallback"] == 3 and rep["generated"] == 0
