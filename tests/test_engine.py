"""The engine's own decode loop against transformers' and peft's ``generate`` (the reference), on tiny models.

Properties: batched == one row at a time == the reference's greedy ids, for the bare base, LoRA, soft prompts
and prefixes, with different adapters mixed in one batch; finished rows leave the batch; a row stops exactly
at its first stop token; out of memory is raised with the failed batch's memory already released.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch
from conftest import greedy_without_cache, make_model, make_tokenizer
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import StoppingCriteria, StoppingCriteriaList

from prompt_recovery.adapters import attach
from prompt_recovery.engine import BatchOutput, Engine, Request

MAX_NEW = 10


class StopAfterFirst(StoppingCriteria):
    """The old engine's rule, for the reference: a stop token ends a row unless it is the first new token."""

    def __init__(self, prompt_len, stop_ids):
        self.prompt_len, self.stop = prompt_len, torch.tensor(sorted(stop_ids))

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, self.prompt_len:]
        if new.shape[1] < 2:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)
        return torch.isin(new[:, 1:], self.stop).any(dim=1)


def reference(model, ids, eos, stop=(), max_new=MAX_NEW):
    """One row, no padding, through generate; a prompt-learning PeftModel through a cache-free greedy loop."""
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning and not stop:
        return greedy_without_cache(model, ids, eos, max_new)
    x = torch.tensor([ids])
    criteria = StoppingCriteriaList([StopAfterFirst(len(ids), stop)]) if stop else None
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                             do_sample=False, num_beams=1, eos_token_id=sorted(eos), pad_token_id=0,
                             stopping_criteria=criteria, temperature=None, top_p=None, top_k=None)
    new = out[0, len(ids):].tolist()
    cut = []
    for t in new:
        if t in eos:
            break
        cut.append(t)
    return cut


def tiny_gemma3(tok, sliding_window=6, seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=sliding_window,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def base(request, tok):
    return make_model(tok) if request.param == "llama" else tiny_gemma3(tok)


def texts(n=6, seed=0):
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "make", "it", "formal", "poem",
             "pirate", "text", "rewrite"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 14))) for _ in range(n)]


def prompts(tok, n=6, seed=0):
    return [tok(t)["input_ids"] for t in texts(n, seed)]


def eos_of(tok):
    return {tok.eos_token_id}


def test_bare_base_batched_equals_one_row_equals_generate(tok, base):
    engine = Engine(base, tok.pad_token_id, eos_of(tok), MAX_NEW)
    batch = prompts(tok)
    together = engine.generate(batch)
    alone = [engine.generate([p])[0] for p in batch]
    assert together == alone
    assert together == [reference(base, p, eos_of(tok)) for p in batch]
    assert all(len(r) > 0 for r in together)


def test_stop_tokens_match_generate_and_cut_exactly_at_the_first(tok, base):
    batch = prompts(tok, 8, seed=3)
    free = Engine(base, tok.pad_token_id, eos_of(tok), MAX_NEW).generate(batch)
    # Make the third new token of the first row a stop token: that row must end right there.
    stop = {free[0][2]}
    engine = Engine(base, tok.pad_token_id, eos_of(tok), MAX_NEW, stop_ids=stop)
    out = engine.generate(batch)
    assert out == [reference(base, p, eos_of(tok), stop) for p in batch]
    for row, full in zip(out, free):
        hits = [k for k, t in enumerate(full) if t in stop and k >= 1]
        want = full[: hits[0] + 1] if hits else full
        assert row == want  # ends at (and keeps) the first stop token after the first token, not later


def test_eos_is_removed_and_ends_the_row(tok, base):
    batch = prompts(tok, 4, seed=5)
    free = Engine(base, tok.pad_token_id, eos_of(tok), MAX_NEW).generate(batch)
    k = next(k for k, t in enumerate(free[0]) if t != free[0][0])
    eos = {free[0][k]}
    out = Engine(base, tok.pad_token_id, eos, MAX_NEW).generate(batch)
    assert out[0] == free[0][:k]
    assert out == [reference(base, p, eos) for p in batch]


def test_outputs_come_back_in_input_order(tok, base):
    engine = Engine(base, tok.pad_token_id, eos_of(tok), 6)
    batch = prompts(tok)
    assert engine.generate(batch[::-1]) == engine.generate(batch)[::-1]


def test_finished_rows_leave_the_batch(tok):
    model = make_model(tok)
    batch = prompts(tok, 6, seed=1)
    free = Engine(model, tok.pad_token_id, eos_of(tok), MAX_NEW).generate(batch)
    eos = {free[0][0]}  # row 0 (and any row starting the same way) finishes on its first token
    sizes: list[int] = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: sizes.append((kw.get("input_ids") if kw.get("input_ids") is not None
                                       else kw["inputs_embeds"]).shape[0]), with_kwargs=True)
    try:
        out = Engine(model, tok.pad_token_id, eos, MAX_NEW).run(batch)
    finally:
        hook.remove()
    assert isinstance(out, BatchOutput) and out.tokens[0] == []
    assert sizes[0] == len(batch)  # the prefill
    # Each decoding step runs exactly the rows that have not finished yet: a row with k new tokens (and no
    # EOS after them) took part in k - 1 steps, a row that ended on EOS in k steps.
    steps = [len(r) - 1 if len(r) == MAX_NEW else len(r) for r in out.tokens]
    assert sizes[1:] == [sum(1 for s in steps if s > k) for k in range(max(steps))]
    assert max(sizes[1:]) < len(batch)  # no decoding step paid for the finished row
    assert out.row_steps == sum(sizes[1:])
    assert out.prefill_tokens == len(batch) * max(len(p) for p in batch)


@pytest.fixture(scope="module")
def lora_pair(tok, tmp_path_factory):
    folders = {}
    for k, name in enumerate(["red", "blue"]):
        torch.manual_seed(10 + k)
        model = get_peft_model(make_model(tok), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                                                           target_modules=["q_proj", "v_proj", "down_proj"],
                                                           init_lora_weights=False))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def test_several_loras_mixed_in_one_batch_equal_each_alone(tok, lora_pair):
    att = attach(make_model(tok), lora_pair, {n: {"peft_type": "LORA"} for n in lora_pair}, quantized=False,
                 base_needed=True)
    assert att.served.lora == frozenset(lora_pair)
    engine = Engine(att.model, tok.pad_token_id, eos_of(tok), MAX_NEW, served=att.served)
    batch = prompts(tok, 6, seed=2)
    names = ["red", "blue", None, "blue", "red", None]
    reqs = [Request(p, adapter=a) for p, a in zip(batch, names)]
    together = engine.generate(reqs)
    assert together == [engine.generate([r])[0] for r in reqs]
    for p, a, got in zip(batch, names, together):
        if a is None:
            want = reference(make_model(tok), p, eos_of(tok))
        else:
            want = reference(PeftModel.from_pretrained(make_model(tok), lora_pair[a]).eval(), p, eos_of(tok))
        assert got == want
    assert together[0] != together[2] or together[1] != together[2]  # the adapters do change the answers


def soft_prompt_folder(tok, base_factory, folder, seed, n_virtual=5):
    torch.manual_seed(seed)
    model = get_peft_model(base_factory(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                               num_virtual_tokens=n_virtual))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.mul_(0).add_(torch.randn_like(p) * 3)
    model.save_pretrained(folder)
    return str(folder)


def prefix_folder(tok, folder, seed, n_virtual):
    """A prefix-tuning adapter with random (not zero-effect) prefixes, saved."""
    torch.manual_seed(seed)
    model = get_peft_model(make_model(tok), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                               num_virtual_tokens=n_virtual))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_soft_prompts_exact_under_padding_and_mixed(tok, tmp_path, family):
    factory = (lambda: make_model(tok)) if family == "llama" else (lambda: tiny_gemma3(tok))
    folders = {"a": soft_prompt_folder(tok, factory, tmp_path / "a", 1, 5),
               "b": soft_prompt_folder(tok, factory, tmp_path / "b", 2, 3)}
    att = attach(factory(), folders, {n: {"peft_type": "PROMPT_TUNING"} for n in folders}, quantized=False)
    engine = Engine(att.model, tok.pad_token_id, eos_of(tok), MAX_NEW, served=att.served)
    batch = prompts(tok, 6, seed=4)
    names = ["a", "b", None, "a", "b", "a"]
    reqs = [Request(p, adapter=a) for p, a in zip(batch, names)]
    together = engine.generate(reqs)
    assert together == [engine.generate([r])[0] for r in reqs]
    for p, a, got in zip(batch, names, together):
        model = factory() if a is None else PeftModel.from_pretrained(factory(), folders[a]).eval()
        assert got == reference(model, p, eos_of(tok)), (a, p)
    assert engine.length(reqs[0]) == len(batch[0]) + 5 and engine.length(reqs[2]) == len(batch[2])


def test_prefix_rows_match_peft_one_row_and_mix_with_others(tok, tmp_path):
    px = prefix_folder(tok, tmp_path / "px", seed=3, n_virtual=4)
    att = attach(make_model(tok), {"px": px}, {"px": {"peft_type": "PREFIX_TUNING"}},
                 quantized=False)
    engine = Engine(att.model, tok.pad_token_id, eos_of(tok), MAX_NEW, served=att.served)
    batch = prompts(tok, 5, seed=6)
    names = ["px", None, "px", None, "px"]
    reqs = [Request(p, adapter=a) for p, a in zip(batch, names)]
    together = engine.generate(reqs)
    assert together == [engine.generate([r])[0] for r in reqs]
    peft_model = PeftModel.from_pretrained(make_model(tok), str(tmp_path / "px")).eval()
    for p, a, got in zip(batch, names, together):
        assert got == reference(peft_model if a else make_model(tok), p, eos_of(tok))


def test_every_kind_of_adapter_in_one_batch_equals_each_alone(tok, lora_pair, tmp_path):
    """A soft prompt, a prefix, a LoRA and the bare base, rows interleaved in one padded batch."""
    folders = {"soft": soft_prompt_folder(tok, lambda: make_model(tok), tmp_path / "soft", 7, 4),
               "px": prefix_folder(tok, tmp_path / "px", seed=5, n_virtual=3), "red": lora_pair["red"]}
    kinds = {"soft": "PROMPT_TUNING", "px": "PREFIX_TUNING", "red": "LORA"}
    att = attach(make_model(tok), folders, {n: {"peft_type": k} for n, k in kinds.items()}, quantized=False,
                 base_needed=True)
    engine = Engine(att.model, tok.pad_token_id, eos_of(tok), MAX_NEW, served=att.served)
    batch = prompts(tok, 8, seed=9)
    names = ["soft", "px", "red", None, "red", "soft", None, "px"]
    reqs = [Request(p, adapter=a) for p, a in zip(batch, names)]
    together = engine.generate(reqs)
    assert together == [engine.generate([r])[0] for r in reqs]
    for p, a, got in zip(batch, names, together):
        model = make_model(tok) if a is None else PeftModel.from_pretrained(make_model(tok), folders[a]).eval()
        assert got == reference(model, p, eos_of(tok)), a


def test_rows_cut_by_the_time_bound_are_flagged(tok):
    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    model = make_model(tok)
    batch = prompts(tok, 4, seed=1)
    free = Engine(model, tok.pad_token_id, eos_of(tok), MAX_NEW).generate(batch)
    eos = {free[0][0]}  # row 0 ends on its first token; the others run on until the bound
    out = Engine(model, tok.pad_token_id, eos, 200, clock=clock).run(batch, max_time=4.5)
    assert out.timed_out
    assert out.cut == [len(r) > 0 and r[0] not in eos for r in out.tokens]
    assert out.cut[0] is False and any(out.cut)


def test_unknown_adapter_is_refused(tok):
    engine = Engine(make_model(tok), tok.pad_token_id, eos_of(tok), 4)
    with pytest.raises(ValueError, match="not served"):
        engine.generate([Request([1, 2], adapter="ghost")])


def test_time_bound_is_checked_between_steps():
    tok = make_tokenizer()
    now = [0.0]

    def clock():
        now[0] += 1.0  # every look at the clock is a second later
        return now[0]

    engine = Engine(make_model(tok), tok.pad_token_id, [], 200, clock=clock)
    out = engine.run(prompts(tok, 2), max_time=3.5)
    assert out.timed_out and all(0 < len(r) <= 3 for r in out.tokens)


def test_sampled_rows_repeat_by_seed_and_ignore_their_batch(tok):
    engine = Engine(make_model(tok), tok.pad_token_id, eos_of(tok), MAX_NEW)
    batch = prompts(tok, 4, seed=7)
    reqs = [Request(p, temperature=1.0, top_p=0.9, seed=s) for s, p in enumerate(batch)]
    together = engine.generate(reqs)
    assert together == [engine.generate([r])[0] for r in reqs]
    other_seed = engine.generate([Request(batch[0], temperature=1.0, top_p=0.9, seed=99 + k) for k in range(6)])
    assert any(row != together[0] for row in other_seed)  # the seed matters


class Exploding(torch.nn.Module):
    """A model whose forward allocates activations, then runs out of memory."""

    def __init__(self, error):
        super().__init__()
        self.emb = torch.nn.Embedding(8, 4)
        self.config = make_model(make_tokenizer()).config
        self.error = error
        self.activations: list[weakref.ref] = []

    def get_input_embeddings(self):
        return self.emb

    def forward(self, **kw):
        big = torch.ones(1024, 1024)
        self.activations.append(weakref.ref(big))
        raise self.error()  # a fresh exception, as torch raises one per failure


@pytest.mark.parametrize("error", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
])
def test_out_of_memory_is_raised_after_the_memory_is_released(error):
    model = Exploding(error)
    engine = Engine(model, 0, [1], 4)
    with pytest.raises(MemoryError) as info:
        engine.generate([[1, 2, 3]])
    gc.disable()  # only references, not a later collection, may free the tensor
    try:
        assert model.activations[0]() is None  # released before the caller could retry
        assert info.value.__context__ is None and info.value.__cause__ is None
    finally:
        gc.enable()


def test_other_errors_pass_through_unchanged():
    model = Exploding(lambda: ValueError("shape mismatch"))
    with pytest.raises(ValueError, match="shape mismatch"):
        Engine(model, 0, [1], 4).generate([[1, 2]])


def test_non_finite_logits_are_reported(tok):
    model = make_model(tok)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        Engine(model, tok.pad_token_id, eos_of(tok), 4).generate(prompts(tok, 2))
