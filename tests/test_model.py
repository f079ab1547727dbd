"""Loader and adapters on a tiny in-process model: real peft adapters, saved, then loaded by predict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import assert_valid_submission, greedy_without_cache, write_test_csv
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

from prompt_recovery import model as model_lib
from prompt_recovery.cli import main
from prompt_recovery.config import ModelArgs
from prompt_recovery.data import InputError
from prompt_recovery.engine import Engine, Request
from prompt_recovery.model import AdapterMismatch, ensure_pad_token
from prompt_recovery.prompt import PromptBuilder, Template

CONFIGS = {
    "prompt_tuning": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    "prefix_tuning": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    "lora": lambda: LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj"], init_lora_weights=False),
}


def make_adapter(base_dir, kind, out_dir, seed=1):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, CONFIGS[kind]())
    with torch.no_grad():  # move the soft prompt / prefix away from its init so it visibly matters
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora" not in name:
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(out_dir)
    model_lib.write_identity(str(out_dir), model_lib.identity(base.config, "tiny-llama"))
    return peft_model.eval()


def first_token_logits(model, ids):
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        return model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0, -1]


def reference_ids(peft_model, ids, eos, n=5):
    """What the in-memory adapter generates for one unpadded row (peft's own generate; a cache-free loop for
    prompt-learning adapters, which peft's generate loses on transformers >= 5.24)."""
    if peft_model.active_peft_config.is_prompt_learning:
        return greedy_without_cache(peft_model, ids, {eos}, n)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                  eos_token_id=eos, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new[: new.index(eos)] if eos in new else new


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_adapter_loads_and_matches_in_memory_model(kind, tiny_model_dir, tmp_path):
    adapter = tmp_path / kind
    in_memory = make_adapter(tiny_model_dir, kind, adapter)
    loaded = model_lib.load(ModelArgs(model=tiny_model_dir, adapter=str(adapter), merge_lora=False))
    assert loaded.adapter_type == {"prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING",
                                   "lora": "LORA"}[kind]
    tok = loaded.tokenizer
    builder = PromptBuilder(tok, Template(), 256)
    rows = [builder.build("Some text.", "Some other text!"), builder.build("A much longer original text here.", "Hi")]
    # Served by the engine (soft prompts after the padding, prefixes in the cache, LoRA routed), both rows in
    # one padded batch, it generates what the in-memory peft model generates for each row alone.
    name = loaded.adapter_names[0]
    engine = Engine(loaded.model, tok.pad_token_id, [tok.eos_token_id], 5, served=loaded.served)
    got = engine.generate([Request(r, adapter=name) for r in rows])
    assert got == [reference_ids(in_memory, r, tok.eos_token_id) for r in rows]
    # ...and the adapter changes what the base model would say.
    base = model_lib.load(ModelArgs(model=tiny_model_dir, adapter="none"))
    plain = Engine(base.model, tok.pad_token_id, [tok.eos_token_id], 5).generate(rows)
    assert plain != got


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_predict_runs_with_each_adapter(kind, tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / kind
    make_adapter(tiny_model_dir, kind, adapter)
    Template(instruction="Say which instruction was used.").save(str(adapter))
    ids = write_test_csv(tmp_path / "t.csv", n=4)
    out = tmp_path / "s.csv"
    report = tmp_path / "r.json"
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(out), "--model", tiny_model_dir, "--adapter",
                 str(adapter), "--no-progress", "--report", str(report), "--max-new-tokens", "6"])
    assert code == 0, capsys.readouterr().err
    assert_valid_submission(out, ids)
    rep = json.loads(report.read_text())
    assert rep["model"]["adapter"] == str(adapter)
    assert rep["template"]["instruction"] == "Say which instruction was used."  # the adapter's template


def test_adapter_for_another_base_is_refused_naming_both(tiny_model_dir, tiny_model_dir_32, tmp_path, capsys):
    adapter = tmp_path / "pt32"
    make_adapter(tiny_model_dir_32, "prompt_tuning", adapter)
    ident = json.loads((adapter / "base_model.json").read_text())
    ident["name"] = "tiny-llama-32"
    (adapter / "base_model.json").write_text(json.dumps(ident))
    with pytest.raises(AdapterMismatch, match=r"tiny-llama-32 \(hidden size 32\).*hidden size 16"):
        model_lib.load(ModelArgs(model=tiny_model_dir, adapter=str(adapter)))
    ids = write_test_csv(tmp_path / "t.csv", n=2)
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(tmp_path / "s.csv"), "--model", tiny_model_dir,
                 "--adapter", str(adapter)])
    err = capsys.readouterr().err
    assert code == 2 and "tiny-llama-32" in err and "Traceback" not in err
    assert_valid_submission(tmp_path / "s.csv", ids)  # the fallback file written before the load stays


def test_plain_peft_folder_without_identity_is_checked_by_shape(tiny_model_dir, tiny_model_dir_32, tmp_path):
    adapter = tmp_path / "lora32"
    make_adapter(tiny_model_dir_32, "lora", adapter)
    (adapter / "base_model.json").unlink()
    with pytest.raises(AdapterMismatch):
        model_lib.load(ModelArgs(model=tiny_model_dir, adapter=str(adapter)))


def test_folder_without_adapter_config_is_input_error(tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="adapter_config.json"):
        model_lib.load(ModelArgs(model=tiny_model_dir, adapter=str(tmp_path)))


def test_lora_is_merged_on_unquantized_base(tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, "lora", tmp_path / "lora")
    merged = model_lib.load(ModelArgs(model=tiny_model_dir, adapter=str(tmp_path / "lora")))
    assert not hasattr(merged.model, "peft_config")
    kept = model_lib.load(ModelArgs(model=tiny_model_dir, adapter=str(tmp_path / "lora"), merge_lora=False))
    assert hasattr(kept.model, "peft_config")


@pytest.mark.parametrize("variant", ["plain", "rslora", "float16"])
def test_lora_merged_by_hand_equals_peft_merge_and_unload(variant, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from prompt_recovery.adapters import lora

    dtype = torch.float16 if variant == "float16" else torch.float32
    torch.manual_seed(3)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, use_rslora=variant == "rslora")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), config).save_pretrained(
        tmp_path / "a")
    folder = str(tmp_path / "a")
    assert lora.plain_lora(folder)
    by_hand = lora.merge_plain(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), folder)
    from peft import PeftModel

    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype),
                                        folder).merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).state_dict()
    want, got = by_peft.state_dict(), by_hand.state_dict()
    assert want.keys() == got.keys()
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(changed) == 3 * 2  # q, v, o in each of the tiny model's two layers
    for k in want:
        assert torch.equal(want[k], got[k]), k


@pytest.mark.parametrize("factors", [torch.bfloat16, torch.float64])
def test_lora_saved_in_another_dtype_merges_as_peft_merges_it(factors, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from prompt_recovery.adapters import lora

    torch.manual_seed(4)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"],
                              init_lora_weights=False)).save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v.to(factors) for k, v in load_file(path).items()}, path)  # as a bf16 or f64 run would save
    from peft import PeftModel

    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     str(tmp_path / "a")).merge_and_unload().state_dict()
    got = lora.merge_plain(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "a")).state_dict()
    for k in want:
        assert torch.equal(want[k], got[k]), k


@pytest.mark.parametrize("config", [dict(init_lora_weights="pissa"), dict(init_lora_weights="olora"),
                                    dict(use_dora=True), dict(alora_invocation_tokens=[1, 2])])
def test_lora_variants_are_not_merged_by_hand(config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from prompt_recovery.adapters import lora

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"],
                              **config)).save_pretrained(tmp_path / "v")
    assert not lora.plain_lora(str(tmp_path / "v"))


def test_lora_on_a_prequantized_folder_is_merged_by_peft_not_by_hand(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, device_map={"": "cpu"})
    quantized.save_pretrained(tmp_path / "q")
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer.json"), tmp_path / "q")
    for name in os.listdir(tiny_model_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tiny_model_dir, name), tmp_path / "q")
    make_adapter(tiny_model_dir, "lora", tmp_path / "lora")
    loaded = model_lib.load(ModelArgs(model=str(tmp_path / "q"), adapter=str(tmp_path / "lora"), device="cpu"))
    assert loaded.served.merged is not None


def test_lora_peft_alone_can_merge_goes_through_peft(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from prompt_recovery.adapters import lora

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"], use_dora=True,
                              init_lora_weights=False)).save_pretrained(tmp_path / "dora")
    assert not lora.plain_lora(str(tmp_path / "dora"))
    merged = model_lib.load(ModelArgs(model=tiny_model_dir, adapter=str(tmp_path / "dora")))
    assert not hasattr(merged.model, "peft_config")  # merged all the same, by peft


def test_lora_with_a_mismatched_layer_is_refused_and_leaves_the_base_untouched(tiny_model_dir, tiny_model_dir_32,
                                                                               tmp_path):
    from transformers import AutoModelForCausalLM

    from prompt_recovery.adapters import lora

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir_32),
                   LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"],
                              init_lora_weights=False)).save_pretrained(tmp_path / "wide")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterMismatch, match="size mismatch for model.layers.0.self_attn.q_proj"):
        lora.load(base, {"wide": str(tmp_path / "wide")}, merge=True)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_loading_a_lone_lora_or_soft_prompt_never_imports_peft(tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, "lora", tmp_path / "lora")
    make_adapter(tiny_model_dir, "prompt_tuning", tmp_path / "soft")
    code = ("import sys; from prompt_recovery import model; from prompt_recovery.config import ModelArgs; "
            f"model.load(ModelArgs(model={tiny_model_dir!r}, adapter=[{str(tmp_path / 'lora')!r}])); "
            f"model.load(ModelArgs(model={tiny_model_dir!r}, adapter=[{str(tmp_path / 'soft')!r}])); "
            "print('peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_4bit_loading_through_bitsandbytes_on_cpu(tmp_path):
    # bitsandbytes quantizes Linear layers in blocks of 64: use a model wide enough for that.
    from conftest import save_tiny

    folder = save_tiny(tmp_path / "m64", hidden_size=64)
    loaded = model_lib.load(ModelArgs(model=folder, quantize="4bit", adapter="none"))
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    ids = PromptBuilder(loaded.tokenizer, Template(), 256).build("Text.", "Rewritten text.")
    out = Engine(loaded.model, loaded.tokenizer.pad_token_id, [loaded.tokenizer.eos_token_id], 4).generate([ids])
    assert len(out) == 1


def test_tokenizer_without_pad_gets_one_that_is_not_eos():
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model(tok)
    tok.pad_token = tok.eos_token
    ensure_pad_token(tok, model)
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == "<unk>"
    tok.unk_token = None
    tok.pad_token = tok.eos_token
    rows = model.get_input_embeddings().weight.shape[0]
    ensure_pad_token(tok, model)  # Llama 3's case: BOS pads, the vocabulary stays as it is
    assert tok.pad_token == "<bos>" and model.get_input_embeddings().weight.shape[0] == rows
    tok.bos_token = None
    tok.pad_token = tok.eos_token
    ensure_pad_token(tok, model)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_model_config_is_never_remote_code(tiny_model_dir, monkeypatch):
    seen = {}
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model_lib.load(ModelArgs(model=tiny_model_dir, adapter="none"))
    assert not seen.get("trust_remote_code") and seen["local_files_only"] is True
    assert seen["use_safetensors"] is True


# ---- a tokenizer with neither pad nor unk (Llama-3 style) --------------------------------------------------------

def make_tokenizer_without_pad_or_unk():
    """Byte-level BPE with only BOS and EOS: every byte is a token, so it needs no unk, and it has no pad."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="module")
def no_pad_model_dir(tmp_path_factory):
    from conftest import make_model

    tok = make_tokenizer_without_pad_or_unk()
    assert tok.pad_token is None and tok.unk_token is None
    folder = tmp_path_factory.mktemp("no-pad")
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", ["prompt-tuning", "lora"])
def test_adapter_trained_on_a_tokenizer_without_pad_or_unk_loads_in_predict(method, no_pad_model_dir, tmp_path,
                                                                            capsys):
    from test_train import args_for

    from prompt_recovery.train import train

    train(args_for(tmp_path, no_pad_model_dir, method))  # adds a pad token and grows the embeddings by a row
    ids = write_test_csv(tmp_path / "t.csv", n=3)
    report = tmp_path / "r.json"
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(tmp_path / "s.csv"), "--model", no_pad_model_dir,
                 "--adapter", str(tmp_path / "adapter"), "--no-progress", "--max-new-tokens", "4",
                 "--report", str(report), "--fallback-prompt", "FALLBACK SENTINEL"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(report.read_text())
    assert rep["error"] is None and rep["model"]["adapter_type"] == {"lora": "LORA"}.get(method, "PROMPT_TUNING")
    # The model ran on every row (a 2-step adapter may still write junk that the cleaner rejects).
    assert rep["batches"] and all(b["status"] == "ok" for b in rep["batches"])
    assert sum(b["rows"] for b in rep["batches"]) == 3 and rep["new_tokens"] > 0
    assert_valid_submission(tmp_path / "s.csv", ids)
    loaded = model_lib.load(ModelArgs(model=no_pad_model_dir, adapter=str(tmp_path / "adapter")))
    n_vocab = len(make_tokenizer_without_pad_or_unk())
    assert loaded.model.get_input_embeddings().weight.shape[0] == n_vocab  # inference needs no resize
    assert loaded.tokenizer.pad_token_id < n_vocab


def test_vocab_check_accepts_only_the_pad_row_train_adds(no_pad_model_dir, tmp_path):
    make_adapter(no_pad_model_dir, "prompt_tuning", tmp_path / "pt")
    ident_path = tmp_path / "pt" / "base_model.json"
    ident = json.loads(ident_path.read_text())
    n = ident["vocab_size"]
    ident_path.write_text(json.dumps({**ident, "vocab_size": n + 1}))  # recorded after the pad resize
    assert model_lib.load(ModelArgs(model=no_pad_model_dir, adapter=str(tmp_path / "pt"))).adapter_type
    ident_path.write_text(json.dumps({**ident, "vocab_size": n + 2}))  # another vocabulary
    with pytest.raises(AdapterMismatch, match="vocab_size"):
        model_lib.load(ModelArgs(model=no_pad_model_dir, adapter=str(tmp_path / "pt")))


# ---- GGUF conversion: dtype by size, dtype in the cache key, abandoned conversions ------------------------------

@pytest.fixture
def fake_gguf_load(monkeypatch, tiny_model_dir):
    """transformers' GGUF reading replaced by the tiny model (a real GGUF needs a real model): records the dtype."""
    import transformers

    seen = []
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained

    def model_from(folder, gguf_file=None, **kw):
        seen.append(kw["dtype"])
        return real_model(tiny_model_dir, dtype=kw["dtype"])

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda folder, gguf_file=None, **kw: real_tok(tiny_model_dir))
    return seen


def test_large_gguf_converts_to_float16_small_to_float32_under_separate_keys(fake_gguf_load, tmp_path, monkeypatch):
    from safetensors import safe_open

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 4096)
    cache = str(tmp_path / "cache")
    small = model_lib.convert_gguf(str(gguf), cache)
    monkeypatch.setattr(model_lib.gguf, "LARGE_GGUF_BYTES", 1024)  # now the same file counts as large
    large = model_lib.convert_gguf(str(gguf), cache)
    assert fake_gguf_load == [torch.float32, torch.float16]
    assert small != large and small.endswith("float32") and large.endswith("float16")
    for folder, want in ((small, torch.float32), (large, torch.float16)):
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            names = list(f.keys())  # a safetensors handle, not a dict
            assert {f.get_tensor(k).dtype for k in names} == {want}
    assert model_lib.convert_gguf(str(gguf), cache) == large and len(fake_gguf_load) == 2  # cached
    assert not any(name.startswith(".convert-") for name in os.listdir(cache))
    assert not os.path.exists(os.path.join(large, model_lib.CONVERT_LOCK))  # the lock ends with the conversion
    # A conversion from before the dtype was in the key is float32: it serves a float32 request, never a float16 one.
    legacy = small[: -len("-float32")]
    os.rename(small, legacy)
    monkeypatch.setattr(model_lib.gguf, "LARGE_GGUF_BYTES", 1 << 30)
    assert model_lib.convert_gguf(str(gguf), cache) == legacy and len(fake_gguf_load) == 2
    shutil.rmtree(large)
    assert model_lib.convert_gguf(str(gguf), cache, dtype="float16") == large and len(fake_gguf_load) == 3


LOCK_HOLDER = """
import sys
from prompt_recovery.model import _lock_conversion
_lock_conversion(sys.argv[1])
print("locked", flush=True)
sys.stdin.readline()  # holds the lock until the test closes stdin
"""


def hold_lock(folder):
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_abandoned_conversions_are_removed_and_running_ones_kept(tmp_path):
    cache = tmp_path / "cache"
    live, dead, old, fresh = (cache / f".convert-{n}" for n in ("live", "dead", "old", "fresh"))
    for d in (live, dead, old, fresh):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    holder = hold_lock(live)  # a conversion under way in another process
    dead_holder = hold_lock(dead)
    dead_holder.stdin.close()  # that process ends without finishing: its lock goes with it
    dead_holder.wait()
    os.utime(old, (time.time() - 2 * model_lib.UNLOCKED_GRACE_S,) * 2)  # unlocked, from before locks existed
    try:
        removed = model_lib.clean_stale_conversions(str(cache))
        assert sorted(removed) == sorted([str(dead), str(old)])
        assert live.is_dir() and fresh.is_dir()  # running, or created this instant and not yet locked
        assert (live / "model.safetensors").read_bytes() == b"partial"
    finally:
        holder.stdin.close()
        holder.wait()
    assert model_lib.clean_stale_conversions(str(cache)) == [str(live)]  # its process is gone now


def test_conversion_cleans_abandoned_folders_on_start(fake_gguf_load, tmp_path):
    cache = tmp_path / "cache"
    dead = cache / ".convert-dead"
    dead.mkdir(parents=True)
    holder = hold_lock(dead)
    holder.stdin.close()
    holder.wait()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    model_lib.convert_gguf(str(gguf), str(cache))
    assert not dead.exists()
