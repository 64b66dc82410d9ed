"""compile_lm: stateful prefill + decode, greedy tokens equal to transformers' generate, one package."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

import anefx
from anefx.ir.errors import AnefxError, TargetUnavailableError
from anefx.ir.ops import cache_write
from anefx.lm.cache import chunk_one_hot, write_chunk
from anefx.targets.coreml import runtime_available

CONTEXT, PREFILL, PROMPT, NEW = 128, 32, 40, 32


def _reinit(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Nothing zero or identity: every weight random, norm weights around 1 ± 0.2."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def _llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return _reinit(LlamaForCausalLM(cfg), 0)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    return _reinit(Qwen3ForCausalLM(cfg), 1)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        sliding_window=24,  # smaller than the prompt: the window must be applied at every step
    )
    return _reinit(MistralForCausalLM(cfg), 2)


def _phi3():
    """One fused qkv_proj sliced into Q, K and V, then rotary."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _reinit(Phi3ForCausalLM(cfg), 3)


def _falcon():
    """Multi-query attention (one K/V head) behind one fused query_key_value, then rotary."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        new_decoder_architecture=False,
        alibi=False,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _reinit(FalconForCausalLM(cfg), 4)


def _bloom():
    """ALiBi biases through baddbmm on (B·H, S, D), one fused query_key_value."""
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    return _reinit(BloomForCausalLM(cfg), 5)


MODELS = {"llama": _llama, "qwen3": _qwen3, "mistral": _mistral, "phi3": _phi3, "falcon": _falcon, "bloom": _bloom}


def _prompt(seed: int, n: int = PROMPT, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, prompt, n, eos=None):
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, prompt.shape[1] :]]


def _weight_operand(op) -> bool:
    """A matmul/linear with a constant tensor operand (x, y or weight): a projection left unconverted."""
    operands = [op.inputs.get(k) for k in ("x", "y", "weight")]
    return any(v is not None and v.op is not None and v.op.op_type == "const" for v in operands)


@pytest.fixture(scope="module")
def compiled_llama():
    model = _llama()
    return model, anefx.compile_lm(model, context_length=CONTEXT, prefill_length=PREFILL, check_tokens=NEW)


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "phi3", "falcon", "bloom"])
def test_greedy_tokens_equal_hf(arch):
    model = MODELS[arch]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = anefx.compile_lm(model, context_length=CONTEXT, prefill_length=PREFILL, convert=False, check_tokens=NEW)
    assert lm.check.tokens_equal and lm.check.new_tokens == NEW and lm.check.prompt_tokens == PROMPT
    assert lm.check.max_logit_error < 1e-3
    for fn in lm.functions:  # every layer per head over the cache, every K and V write from the projection
        stats = lm.reports[fn].record("attention_bc1s").stats
        assert stats["rewritten"] == 2 and stats["unmatched"] == 0 and stats["heads"] == 8, (fn, stats)
        assert stats["keys_last"] == 2, (fn, stats)  # over the cache as it lies
    for seed in (10, 11):  # prompts the compile never saw, two prefill chunks each
        prompt = _prompt(seed)
        out = lm.generate(prompt, NEW, eos_token_id=None)
        assert out.new_tokens == _hf_greedy(model, prompt, NEW, eos=None)
        assert len(out.new_tokens) == NEW and out.stop_reason == "max_new_tokens"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # never modified


def test_llama_generation_and_package(compiled_llama, tmp_path):
    model, lm = compiled_llama
    # the end-to-end check ran the fp16 package (the MIL interpreter), teacher forced against HF
    assert lm.check.runtime == "target" and lm.check.prompt_tokens == PROMPT
    assert lm.check.agreement >= 0.9 and len(lm.check.step_errors) == len(lm.check.reference)
    assert all(r["ok"] for r in lm.reports["decode"].artifact.values())  # each function executed
    prompt = _prompt(20)
    out = lm.generate(prompt, NEW, eos_token_id=None)
    assert out.new_tokens == _hf_greedy(model, prompt, NEW, eos=None)
    assert out.sequences.shape == (1, PROMPT + NEW)
    # a prompt shorter than one chunk, and one that fills exactly one chunk
    for n in (5, PREFILL):
        p = _prompt(21 + n, n)
        assert lm.generate(p, 8, eos_token_id=None).new_tokens == _hf_greedy(model, p, 8, eos=None)

    assert lm.functions == ["prefill", "decode"]
    assert lm.states == {
        **{f"key_cache_{i}": (1, 2, 16, CONTEXT) for i in range(2)},
        **{f"value_cache_{i}": (1, 2, 16, CONTEXT) for i in range(2)},
    }
    for fn in lm.functions:
        hist = lm.op_histogram(fn)
        assert hist["read_state"] == 4 and hist["coreml_update_state"] == 4, hist
        assert hist["gather_nd"] == 0 and hist["scatter"] == 0, hist
        assert hist["slice_update"] == (4 if fn == "decode" else 0), hist  # decode: one column per state
        assert hist["linear"] == 0, hist
        ops = lm.package.operations(fn)
        # no tensor beyond 4-D, the ANE's native rank: prefill's grouped products drop the unit batch axis
        assert max(len(o.shape) for op in ops for o in op.outputs if o.shape is not None) == 4
        if fn == "prefill":  # the LM head runs on the last position only
            shapes = [tuple(o.shape) for op in ops if op.op_type != "const" for o in op.outputs if o.shape is not None]
            assert not [shp for shp in shapes if 256 in shp and PREFILL in shp], shapes
        on_weights = [op.name for op in ops if op.op_type in ("matmul", "linear") and _weight_operand(op)]
        assert not on_weights, on_weights
        # fp16-safe masks: no infinite constant anywhere (bool masks become -3e4 in coremltools)
        consts = [op.outputs[0].val for op in ops if op.op_type == "const" and op.outputs[0].val is not None]
        assert not any(
            np.isinf(np.asarray(v, dtype=np.float64)).any() for v in consts if np.asarray(v).dtype.kind == "f"
        )

    path = lm.save(tmp_path / "lm.mlpackage")
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    functions = {f.name: f for f in spec.description.functions}
    assert set(functions) == {"prefill", "decode"}
    assert spec.description.defaultFunctionName == "decode"
    for f in functions.values():
        assert {s.name for s in f.state} == set(lm.states)
        assert [i.name for i in f.input] == ["input_ids", "position_ids"]
    for fn, tokens in (("prefill", PREFILL), ("decode", 1)):
        assert [list(i.type.multiArrayType.shape) for i in functions[fn].input] == [[1, tokens]] * 2
        # the last position's logits only: no (1, prefill_length, vocab) tensor leaves the prefill
        assert [list(o.type.multiArrayType.shape) for o in functions[fn].output] == [[1, 1, 256]]
    meta = dict(spec.description.metadata.userDefined)
    assert meta["co.huggingface.exporters.task"] == "text-generation"
    assert int(meta["anefx.context_length"]) == CONTEXT and int(meta["anefx.prefill_length"]) == PREFILL
    assert json.loads(meta["anefx.eos_token_ids"]) == lm.eos_token_ids == [2]
    assert set(json.loads(meta["anefx.inputs"])) == {"input_ids", "position_ids", "logits"}
    # weights are shared: one copy of the weights for both functions
    weights = sum(f.stat().st_size for f in path.rglob("weight.bin"))
    params = sum(p.numel() for p in model.parameters())
    assert weights < 1.5 * 2 * params


def _cache_readers(program) -> list[tuple[str, str, tuple]]:
    """Every op of a MIL function that takes a whole cache state (its value as read, or as written
    back): (op type, input name, shape of what it writes)."""
    state_values, found = set(), []
    for op in program.operations:
        if op.op_type == "read_state":
            state_values.add(op.outputs[0].name)
            continue
        for key, var in op.inputs.items():
            for v in var if isinstance(var, (list, tuple)) else (var,):
                if v.name in state_values:
                    found.append(
                        (
                            op.op_type,
                            key,
                            tuple(op.inputs["update"].shape) if key == "x" and "update" in op.inputs else (),
                        )
                    )
        if op.op_type in ("slice_update", "coreml_update_state") and any(
            v.name in state_values
            for k, v in op.inputs.items()
            if k in ("x", "value") and not isinstance(v, (list, tuple))
        ):
            state_values.update(o.name for o in op.outputs)
    return found


def test_decode_reads_each_cache_once_and_writes_one_column(compiled_llama):
    """The decode program (saved, read back): every cache state is only read by the two attention
    products (scores and weighted sum: no transpose, reshape or elementwise op takes a whole cache)
    and written by one ``slice_update`` of one column; the same at depth 2 and 4."""
    from anefx.targets.mil.reader import read_package

    shallow = compiled_llama[1]
    deep = anefx.compile_lm(_llama(layers=4), context_length=CONTEXT, prefill_length=PREFILL, check_tokens=4)
    assert deep.check.agreement >= 0.75  # the check runs the fp16 package: a near-tie may flip
    for lm, layers in ((shallow, 2), (deep, 4)):
        for fn in lm.functions:
            stats = lm.reports[fn].record("attention_bc1s").stats
            assert stats["rewritten"] == stats["keys_last"] == layers and stats["unmatched"] == 0, stats
        program = read_package(lm.package.path).program.functions["decode"]
        readers = _cache_readers(program)
        kinds = sorted({(t, k) for t, k, _ in readers})
        assert kinds == [("coreml_update_state", "value"), ("matmul", "y"), ("slice_update", "x")], kinds
        assert sum(t == "matmul" for t, _, _ in readers) == 2 * layers  # K by the scores, V by the weighted sum
        columns = [shape for t, k, shape in readers if t == "slice_update"]
        assert len(columns) == 2 * layers and all(shape[-1] == 1 for shape in columns), columns
        hist = lm.op_histogram("decode")
        assert hist["matmul"] == 2 * layers and hist["einsum"] == 0


def test_stops_at_context_length_and_eos(compiled_llama):
    model, lm = compiled_llama
    prompt = _prompt(30, CONTEXT - 4)
    with pytest.warns(UserWarning, match="cache is full"):
        out = lm.generate(prompt, 50, eos_token_id=None)
    assert out.stop_reason == "context_length" and "context_length" in out.message
    assert len(out.new_tokens) == 5  # the last prompt token's logits, then one per free slot
    assert out.new_tokens == _hf_greedy(model, prompt, 5, eos=None)
    first = lm.generate(_prompt(31), 4, eos_token_id=None).new_tokens
    stopped = lm.generate(_prompt(31), 4, eos_token_id=first[1])
    assert stopped.new_tokens == first[:2] and stopped.stop_reason == "eos"
    with pytest.raises(AnefxError, match="context_length"):
        lm.generate(_prompt(32, CONTEXT + 1), 1)


def test_coreml_runtime_is_guarded(compiled_llama):
    _, lm = compiled_llama
    ok, why = runtime_available()
    if ok:  # pragma: no cover - macOS
        prompt = _prompt(40)
        assert lm.generate(prompt, 8, runtime="coreml").new_tokens == lm.generate(prompt, 8).new_tokens
    else:
        with pytest.raises(TargetUnavailableError, match="macOS"):
            lm.generate(_prompt(40), 1, runtime="coreml")
        pytest.skip(f"Core ML runtime: {why}")


@pytest.mark.parametrize(
    "positions, length",
    [
        ([3], 64),
        ([0, 1, 2, 3], 64),
        ([-2, -1, 0, 1], 64),
        ([5, 6, 62, 63], 64),
        ([30, 31, 32, 33, 34], 32),
        ([60, 61], 32),
    ],
)
def test_chunk_write_equals_index_copy(positions, length):
    """A prefill chunk's one-hot write is an index_copy at ``p mod length`` (a ring when the cache is
    shorter than the context), the last token of the chunk to reach a slot winning, positions
    outside [0, context) dropped; the decode write (cache_write) is index_copy at the slot."""
    gen = torch.Generator().manual_seed(0)
    context, heads, dim = 64, 2, 8
    cache = torch.randn(1, heads, dim, length, generator=gen)
    new = torch.randn(1, heads, dim, len(positions), generator=gen)
    pos = torch.tensor([positions], dtype=torch.int32)
    got = write_chunk(cache, new, chunk_one_hot(pos, length, context, torch.float32))
    expected = cache.clone()
    for t, p in enumerate(positions):
        if 0 <= p < context:
            expected[..., p % length] = new[..., t]
    assert torch.equal(got, expected)
    slot = torch.tensor([[positions[0] % length]], dtype=torch.int32)
    one = cache_write(cache, new[..., :1], slot, 3)
    expected = cache.clone()
    expected[..., positions[0] % length] = new[..., 0]
    assert torch.equal(one, expected)


def test_bad_arguments_are_explained():
    with pytest.raises(AnefxError, match="prefill_length"):
        anefx.compile_lm(_llama(), context_length=32, prefill_length=64)
    with pytest.raises(AnefxError, match="target='coreml'"):  # Core AI holds states, not compression (yet)
        anefx.compile_lm(_llama(), target="coreai", compression="lut6")

    class NoCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)

        def forward(self, input_ids, position_ids=None, past_key_values=None, use_cache=True):
            return (self.emb(input_ids),)

    with pytest.raises(AnefxError, match=r"past_key_values\.update"):
        anefx.compile_lm(NoCache(), context_length=32, prefill_length=8)


def test_smollm2_answers_like_hf():
    """Trained weights: SmolLM2-135M-Instruct answers the chat prompt with HF's tokens."""
    from examples.models import smollm2_chat_ids, smollm2_model_and_tokenizer

    model, tok = smollm2_model_and_tokenizer()
    ids = smollm2_chat_ids(tok)
    lm = anefx.compile_lm(model, context_length=64, prefill_length=32, check_prompt=ids, check_tokens=16, convert=False)
    assert lm.check.tokens_equal and lm.check.compiled[-1] == 2  # both stop at <|im_end|>
    out = lm.generate(ids, 16)
    text = tok.decode(out.new_tokens, skip_special_tokens=True)
    assert text.strip() == "The capital of France is Paris."
    assert out.stop_reason == "eos" and out.new_tokens[-1] == 2
    assert lm.states["key_cache_0"] == (1, 3, 64, 64) and len(lm.states) == 60


def test_cli_generate_streams_hf_tokens(capsys):
    from pathlib import Path

    from anefx.cli import main
    from examples.models import tiny_llama_lm

    factory = str(Path(__file__).resolve().parents[1] / "examples" / "models.py") + ":tiny_llama_lm"
    prompt = _prompt(50, 20)
    argv = ["generate", factory, "--prompt-ids", ",".join(str(int(t)) for t in prompt[0])]
    argv += ["--context-length", "64", "--prefill-length", "16", "--check-tokens", "4", "--no-convert"]
    assert main([*argv, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    expected = _hf_greedy(tiny_llama_lm(), prompt, 6, eos=[2])
    assert " ".join(map(str, expected)) in out and f"[{len(expected)} tokens, stopped:" in out
    assert "greedy tokens equal" in out


def test_cli_compile_lm_compressed_and_chunked(tmp_path, capsys):
    """``anefx compile-lm --compression lut4 --max-chunk-mb``: chunk packages with LUT weights, the
    measured agreement printed; a refused scheme exits before any work and writes nothing."""
    from pathlib import Path

    from anefx.cli import main
    from anefx.targets.coreml import package_weight_bytes

    factory = str(Path(__file__).resolve().parents[1] / "examples" / "models.py") + ":tiny_llama_lm"
    refused = tmp_path / "refused.mlpackage"
    assert main(["compile-lm", factory, "-o", str(refused), "--compression", "int4"]) == 2
    assert "wrong output on the Neural Engine" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "tiny.mlpackage"
    argv = ["compile-lm", factory, "-o", str(out), "--context-length", "64", "--prefill-length", "16"]
    argv += ["--check-tokens", "4", "--compression", "lut4", "--max-chunk-mb", "0.05", "--quality-tokens", "6"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "lut4: weights x0." in text and "greedy-token agreement" in text and "4 prompts x 6 new tokens" in text
    assert "2 chunks of at most 0.05 MB" in text
    folder = tmp_path / "tiny"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["chunks"]) == 2
    import coremltools as ct

    for entry in manifest["chunks"]:
        assert 0 < package_weight_bytes(folder / entry["file"]) <= 0.05e6
        spec = ct.utils.load_spec(str(folder / entry["file"]))
        assert spec.description.metadata.userDefined["anefx.compression"] == "lut4"


def test_compile_lm_takes_the_compile_options():
    """never_worse, lm_head, pipeline and the debug switches as compile takes them; each function's
    converter input validated by the same code as compile's (its error in the function's report)."""
    from anefx.targets.lm_head import LMHeadOptions

    model = _llama()
    pipeline = anefx.Pipeline.default().without("attention_chunks")
    lm = anefx.compile_lm(
        model,
        context_length=64,
        prefill_length=16,
        check_tokens=4,
        pipeline=pipeline,
        never_worse=False,
        lm_head=LMHeadOptions(max_channels=128),
        options=anefx.CompileOptions(validate="lint"),  # the explicit validate below wins
        validate="numeric",
        check_runtime="torch",  # the rewritten graphs: their greedy tokens are the model's
    )
    assert lm.check.tokens_equal and lm.check.runtime == "torch"
    for fn in lm.functions:
        report = lm.reports[fn]
        assert [r.name for r in report.records] == pipeline.names and report.guard == {}
        assert report.conversion["lm_head"] == {"lm_head_split": 1, "output": "logits"}
        assert float(report.conversion["converter_input_max_rel_error"]) < 1e-4
        assert report.conversion["checks"]["converter_input"]["input_sets"] == 2  # example + random
        # the 256-token head as two 128-channel convs: one conv more than the 7 per layer and the head
        assert lm.op_histogram(fn)["conv"] == 2 * 7 + 2
    assert lm.timings.keys() >= {"probe", "capture.prefill", "passes.decode", "convert.decode.ct_convert", "check"}
    staged = lm.package.path  # the merged package, staged in a private folder until saved
    assert staged.is_dir()
    del lm
    gc.collect()
    assert not staged.parent.parent.exists()  # removed with the last reference: nothing left behind


def test_compile_lm_for_core_ai_runs_on_linux(tmp_path):
    """compile_lm(target="coreai"): one .aimodel with prefill and decode over the same states,
    executed by coreai-core's runtime (Linux CPU) for the end-to-end check and for generate."""
    from anefx.targets.coreai import runtime_available as coreai_runtime

    ok, why = coreai_runtime()
    if not ok:
        pytest.skip(why)
    model = _llama()
    lm = anefx.compile_lm(model, target="coreai", context_length=64, prefill_length=16, check_tokens=8)
    assert lm.check.runtime == "target" and lm.check.agreement == 1.0 and lm.check.tokens_equal
    assert all(r["ok"] and r["runtime"] == "coreai" for r in lm.reports["prefill"].artifact.values())
    prompt = _prompt(5, 20)
    out = lm.generate(prompt, 8, eos_token_id=None, runtime="coreai")
    assert out.new_tokens == _hf_greedy(model, prompt, 8)
    path = lm.save(tmp_path / "lm.aimodel")
    program = anefx.load(path)
    try:
        assert program.functions == ["prefill", "decode"] or set(program.functions) == {"prefill", "decode"}
        assert set(program.states("decode")) == set(lm.states) == set(program.states("prefill"))
        assert list(program.inputs("prefill")) == ["input_ids", "position_ids"]
    finally:
        program.close()
