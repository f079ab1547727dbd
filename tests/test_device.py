"""Device choices on CPU with the GPU faked: dtype by compute capability, SDPA attention, the forced-capability
setting, and upcast() of a float16 model that overflows (plain, LoRA, soft prompt, bitsandbytes 4-bit)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

from prompt_recovery import model as model_lib
from prompt_recovery.config import ModelArgs
from prompt_recovery.data import InputError
from prompt_recovery.model import CAPABILITY_ENV, Loaded


def fake_cuda(monkeypatch, capability):
    """A visible GPU of this compute capability; torch.cuda.is_bf16_supported() says True, as it does on a T4."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    monkeypatch.delenv(CAPABILITY_ENV, raising=False)


@pytest.fixture
def spy_load(monkeypatch):
    """Record from_pretrained's arguments, then load on CPU (quantization and device map dropped)."""
    import transformers

    seen: dict = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.clear()
        seen.update(kw)
        kw = {k: v for k, v in kw.items() if k != "quantization_config"}
        kw["device_map"] = {"": "cpu"}
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    return seen


@pytest.mark.parametrize("capability, want", [
    ((7, 5), torch.float16),  # T4: no bfloat16 tensor cores although is_bf16_supported() is True
    ((6, 0), torch.float16),  # P100
    ((8, 0), torch.bfloat16),  # A100
    ((9, 0), torch.bfloat16),  # H100
])
def test_dtype_and_4bit_compute_follow_capability_and_attention_is_sdpa(capability, want, monkeypatch, spy_load,
                                                                       tiny_model_dir):
    fake_cuda(monkeypatch, capability)
    loaded = model_lib.load(ModelArgs(model=tiny_model_dir, adapter="none", quantize="4bit"))
    assert spy_load["dtype"] == want
    assert spy_load["quantization_config"].bnb_4bit_compute_dtype == want
    assert loaded.info["dtype"] == str(want).replace("torch.", "") and loaded.info["dtype_reason"]
    assert loaded.info["capability"] == f"{capability[0]}.{capability[1]}"
    # SDPA runs on every one of these cards: eager is never forced by age.
    assert spy_load.get("attn_implementation") in (None, "sdpa")
    assert loaded.info["attention"] == loaded.model.config._attn_implementation == "sdpa"


def test_cpu_is_float32(spy_load, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = model_lib.load(ModelArgs(model=tiny_model_dir, adapter="none"))
    assert spy_load["dtype"] == torch.float32 and loaded.info["dtype"] == "float32"
    assert loaded.info["capability"] is None


@pytest.mark.parametrize("capability, asked", [((7, 5), "bfloat16"), ((8, 0), "float16"), ((9, 0), "float32")])
def test_explicit_dtype_wins(capability, asked, monkeypatch, spy_load, tiny_model_dir):
    fake_cuda(monkeypatch, capability)
    loaded = model_lib.load(ModelArgs(model=tiny_model_dir, adapter="none", dtype=asked))
    assert spy_load["dtype"] == getattr(torch, asked) and "asked for" in loaded.info["dtype_reason"]


def test_forced_capability_gives_a_t4_s_choices_on_a_newer_gpu(monkeypatch, spy_load, tiny_model_dir):
    fake_cuda(monkeypatch, (9, 0))
    monkeypatch.setenv(CAPABILITY_ENV, "7.5")
    loaded = model_lib.load(ModelArgs(model=tiny_model_dir, adapter="none"))
    assert spy_load["dtype"] == torch.float16
    assert loaded.info["capability"] == "7.5" and loaded.info["capability_forced"] is True
    assert loaded.info["attention"] == "sdpa"
    monkeypatch.setenv(CAPABILITY_ENV, "sm75")
    with pytest.raises(InputError, match=CAPABILITY_ENV):
        model_lib.cuda_capability()


def test_training_dtype_is_bfloat16_only_where_native():
    cuda_75 = model_lib.choose_dtype("auto", "cuda", (7, 5), training=True)[0]
    assert cuda_75 == torch.float32  # float16 training would overflow without a gradient scaler
    assert model_lib.choose_dtype("auto", "cuda", (8, 0), training=True)[0] == torch.bfloat16
    assert model_lib.choose_dtype("auto", "cpu", None, training=True)[0] == torch.float32


def test_transformers_keeps_eager_for_a_model_that_needs_it(monkeypatch, spy_load, tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    fake_cuda(monkeypatch, (7, 5))
    tok = make_tokenizer()
    config = Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = model_lib.load(ModelArgs(model=str(tmp_path), adapter="none"))
    assert loaded.info["attention"] == "eager"  # soft-capped attention: SDPA cannot run it


# ---- upcast -------------------------------------------------------------------------------------------------

HIDDEN = 64  # bitsandbytes quantizes in blocks of 64


def save_overflowing_model(folder) -> str:
    """A tiny Llama whose first MLP sums 128^2 x (its normalised input's squares): past float16's 65504 whatever
    the input (RMS norm fixes the sum of squares), fine in float32.

    Every weight is a float16 value, so a float16 load holds exactly the float32 load's weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        rows = torch.arange(2 * HIDDEN)
        for proj in (mlp.gate_proj, mlp.up_proj):  # silu(128 x) * 128 x: about (128 x)^2 where x > 0, else about 0
            proj.weight.zero_()
            proj.weight[rows, rows % HIDDEN] = 128.0
        mlp.down_proj.weight.fill_(1.0)
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def overflow_dir(tmp_path_factory):
    return save_overflowing_model(tmp_path_factory.mktemp("overflow"))


def add_adapter(base_dir, kind, out_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    cfg = (LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
           if kind == "lora" else PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(out_dir)
    model_lib.write_identity(str(out_dir), model_lib.identity(base.config, "overflow"))
    return str(out_dir)


def last_logits(model, n=12):
    ids = torch.arange(5, 5 + n).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()


@pytest.mark.parametrize("adapter", ["none", "lora", "prompt_tuning"])
def test_upcast_turns_an_overflowing_float16_model_into_the_float32_one(adapter, overflow_dir, tmp_path):
    folder = "none" if adapter == "none" else add_adapter(overflow_dir, adapter, tmp_path / adapter)
    common = dict(model=overflow_dir, adapter=folder, device="cpu", merge_lora=False)
    half = model_lib.load(ModelArgs(dtype="float16", **common))
    assert not torch.isfinite(last_logits(half.model)).all()  # the overflow this is about
    report = model_lib.upcast(half)
    assert report["changed"] and report["from"] == "float16" and report["to"] == "float32"
    assert half.info["dtype"] == "float32" and "upcast" in half.info["dtype_reason"]
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    want = last_logits(model_lib.load(ModelArgs(dtype="float32", **common)).model)
    got = last_logits(half.model)
    assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert model_lib.upcast(half)["changed"] is False  # nothing left to switch: a retry would not help


def test_upcast_of_a_4bit_model_switches_compute_and_unquantized_weights(overflow_dir):
    import bitsandbytes as bnb

    common = dict(model=overflow_dir, adapter="none", device="cpu", quantize="4bit")
    half = model_lib.load(ModelArgs(dtype="float16", **common))
    assert not torch.isfinite(last_logits(half.model)).all()
    report = model_lib.upcast(half)
    layers = [m for m in half.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and report["linear4bit"] == len(layers)
    assert all(m.compute_dtype == torch.float32 for m in layers)
    assert all(p.dtype in (torch.float32, torch.uint8) for p in half.model.parameters())
    want = last_logits(model_lib.load(ModelArgs(dtype="float32", **common)).model)
    got = last_logits(half.model)
    assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adapter", ["none", "prompt_tuning"])
def test_predict_detects_the_overflow_on_its_first_batch_and_recovers(adapter, overflow_dir, tmp_path):
    """float16 that overflows: the first batch's non-finite logits switch the model to float32, and the rows are
    generated (not lost to fallbacks); the report says what happened."""
    from conftest import assert_valid_submission, write_test_csv

    from prompt_recovery.config import GenerationArgs, PredictArgs
    from prompt_recovery.predict import predict

    folder = "none" if adapter == "none" else add_adapter(overflow_dir, adapter, tmp_path / adapter)
    ids = write_test_csv(tmp_path / "t.csv", n=6)
    common = dict(test_csv=str(tmp_path / "t.csv"), progress=False, generation=GenerationArgs(max_new_tokens=4))
    half = predict(PredictArgs(output=str(tmp_path / "half.csv"), model=ModelArgs(
        model=overflow_dir, adapter=folder, device="cpu", dtype="float16"), **common))
    full = predict(PredictArgs(output=str(tmp_path / "full.csv"), model=ModelArgs(
        model=overflow_dir, adapter=folder, device="cpu", dtype="float32"), **common))
    assert len(half.recoveries) == 1 and "float16 to float32" in half.recoveries[0]
    assert half.model["dtype"] == "float32" and "upcast" in half.model["dtype_reason"]
    assert "non_finite" not in half.fallback_reasons and half.generated == full.generated
    assert [b["status"] for b in half.batches][0] == "non_finite"  # the first try, before the switch
    assert assert_valid_submission(tmp_path / "half.csv", ids) == assert_valid_submission(tmp_path / "full.csv", ids)
    assert full.recoveries == []


@pytest.mark.parametrize("capability, want", [((7, 5), torch.float32), ((8, 0), torch.bfloat16)])
def test_safe_dtype_is_bfloat16_only_where_native(capability, want, monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    fake_cuda(monkeypatch, capability)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)
    rotary = {k: b for k, b in model.named_buffers() if b.dtype == torch.float32}
    loaded = Loaded(model=model, tokenizer=None, identity={}, info={"device": "cuda", "dtype": "float16"})
    assert model_lib.upcast(loaded)["to"] == str(want).replace("torch.", "")
    assert all(p.dtype == want for p in model.parameters())
    assert all(b.dtype == torch.float32 for k, b in model.named_buffers() if k in rotary)  # precision kept


# ---- the GPU benchmark's CPU mode ---------------------------------------------------------------------------------

@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench_gpu.py imported by name: replica processes unpickle its loader by module name."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("bench_gpu")


def test_bench_gpu_tiny_runs_every_step_on_cpu(bench, tmp_path):
    import json

    code = bench.main(["--tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    results = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert code == 0 and {s: results[s]["status"] for s in bench.STEPS} == dict.fromkeys(bench.STEPS, "ok")
    for step in ("scheduler", "t4"):
        for adapter in ("lora", "soft_prompt"):
            m = results[step][adapter]
            assert m["rows"] == 8 and m["batched"]["new_tokens"] > 0 and m["speedup"] > 0
    assert results["t4"]["lora"]["batched_prefill"]["seconds"] > 0
    assert results["t4"]["forced_capability"] == "7.5"
    rep = results["replicas"]
    assert rep["exit_codes"] == [0, 0] and rep["merged_valid"] and rep["same_absolute_end"]
    assert all(share > 0.5 for share in rep["budget_share_of_whole_run"])  # not the half their rows would give
    table = (tmp_path / "out" / "bench_gpu.md").read_text()
    assert "| step | variant | rows | rows/s | ratio | peak GPU MB | notes |" in table and "replicas" in table


def test_bench_gpu_steps_run_as_child_processes(bench, tmp_path):
    import json

    bench.main(["--tiny", "--children", "--steps", "prepare", "--out", str(tmp_path / "out"),
                "--work", str(tmp_path / "work")])
    results = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert results["prepare"]["status"] == "ok" and results["prepare"]["tokenizer_vocab"] > 0
    assert (tmp_path / "work" / "model" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "work" / "lora" / "adapter_model.safetensors").is_file()


def test_upcast_that_would_not_fit_changes_nothing(overflow_dir, monkeypatch):
    half = model_lib.load(ModelArgs(model=overflow_dir, adapter="none", device="cpu", dtype="float16"))
    monkeypatch.setattr(model_lib.dtypes, "_room", lambda device: 1024)  # a GPU with 1 KiB free
    report = model_lib.upcast(half)
    assert report["changed"] is False and "GiB free" in report["refused"]
    assert {p.dtype for p in half.model.parameters()} == {torch.float16} and half.info["dtype"] == "float16"
