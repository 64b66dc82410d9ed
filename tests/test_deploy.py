"""Weight compression (coremltools.optimize, measured in torch) and chunking under a size cap.

A small Llama (hidden 320 so coremltools clusters each 32-channel group with its exact 1-D k-means,
weights re-initialised so nothing is zero or identity) carries the mechanics; SmolLM2's figures
are in the benchmark (``examples/benchmark.py --compression``).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import anefx
from anefx.ir.errors import AnefxError
from anefx.targets.compression import CompressionOptions
from anefx.targets.coreml import CoreMLOptions, package_weight_bytes
from anefx.targets.quality import decode_lut, decompressed_weights, lm_agreement

SEQ = 16


def _llama(layers=2, vocab=384):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=320,
        intermediate_size=640,
        num_hidden_layers=layers,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        use_cache=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, vocab, (1, SEQ))
    return model, (ids,), {"attention_mask": torch.ones(1, SEQ, dtype=torch.long)}


def _compile_module():
    return sys.modules["anefx.core.stages"]  # where every front end captures


@pytest.fixture
def no_capture(monkeypatch):
    """Fail the test if compile gets as far as capturing the model."""

    def boom(*a, **k):
        raise AssertionError("capture ran: the error came too late")

    monkeypatch.setattr(_compile_module(), "capture", boom)


# ---------------------------------------------------------------------------------------------
# Refusals: before any long work, nothing on disk
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compression", "options", "words"),
    [
        ("int4", None, ["wrong output on the Neural Engine", "lut4", "coreai-models#279"]),
        (CompressionOptions(scheme="int8", block_size=32), None, ["per-block", "wrong output", "'int8'"]),
        ("lut3", None, ["unknown compression scheme 'lut3'", "lut4, lut6, lut8, int8"]),
        ("lut6", CoreMLOptions(minimum_deployment_target="iOS17"), ["iOS18", "iOS17", "per_tensor"]),
        (CompressionOptions(granularity="per_block"), None, ["per_block", "per_grouped_channel"]),
    ],
)
def test_refused_compression_fails_before_capture(compression, options, words, no_capture):
    model, args, kwargs = _llama(layers=1)
    with pytest.raises(AnefxError) as info:
        anefx.compile(model, args, kwargs, compression=compression, target_options=options)
    for w in words:
        assert w in str(info.value)


def test_per_tensor_luts_are_allowed_before_ios18(no_capture):
    """Only grouped-channel tables need iOS18: per-tensor LUTs pass the check (and reach capture)."""
    model, args, kwargs = _llama(layers=1)
    with pytest.raises(AssertionError, match="capture ran"):
        anefx.compile(
            model,
            args,
            kwargs,
            compression=CompressionOptions(scheme="lut6", granularity="per_tensor"),
            target_options=CoreMLOptions(minimum_deployment_target="iOS16"),
        )


def test_impossible_cap_fails_before_capture_and_writes_nothing(tmp_path, no_capture):
    model, args, kwargs = _llama(layers=2)
    layer_mb = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n) * 2 / 1e6
    with pytest.raises(AnefxError) as info:
        anefx.compile(model, args, kwargs, max_chunk_mb=layer_mb * 0.9)
    text = str(info.value)
    assert "impossible" in text and "layer 0" in text and f"{layer_mb:.1f} MB" in text
    # with lut4 (a quarter of the bytes) the same cap is possible: the check counts the scheme's bits
    with pytest.raises(AssertionError, match="capture ran"):
        anefx.compile(model, args, kwargs, max_chunk_mb=layer_mb * 0.9, compression="lut4")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_scheme(tmp_path, capsys):
    from anefx.cli import main

    out = tmp_path / "m.mlpackage"
    code = main(["compile", "examples/models.py:mlp", "-o", str(out), "--compression", "int4"])
    assert code == 2
    assert "wrong output on the Neural Engine" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Compression: what ships, and its quality measured on the shipped weights
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lut4():
    model, args, kwargs = _llama(layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = anefx.compile(model, args, kwargs, compression=CompressionOptions(scheme="lut4", keep_lm_head=True))
    return compiled, model, args, kwargs, before


def test_lut4_ships_luts_for_every_planned_weight(lut4, tmp_path):
    compiled, model, _, _, before = lut4
    comp = compiled.compression
    ops = compiled.artifact.operations()
    luts = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    shipped = comp.shipped
    # the 7 projections; the tied embedding table is stored once, shared with the LM head, so
    # keep_lm_head keeps it fp16
    assert len(shipped) == 7 and len(luts) == 7
    assert [w.param for w in comp.weights].count("lm_head.weight") == 1
    kept = [w for w in comp.weights if w.scheme == "fp16"]
    assert [(w.param, w.role, w.reason) for w in kept] == [("lm_head.weight", "embedding,lm_head", "keep_lm_head")]
    # grouped-channel tables: one 16-entry table per 32 output channels
    for op in luts:
        lut = op.inputs["lut"].val
        assert lut.shape[-2:] == (16, 1) and op.outputs[0].shape[0] // lut.shape[0] == 32
        dense = op.materialized_val_inference()
        assert np.array_equal(decode_lut(op.inputs["indices"].val, lut), dense)
        # what quality measurement reads: the interpreter's kernels (coremltools' expansion is too slow)
        read_back = decompressed_weights(comp.functions["main"].model)
        assert np.array_equal(read_back[op.name.removesuffix("_palettized")], dense)
    # size: the saved weights shrink to about 4/16 for what was compressed, the kept head is fp16
    fp16_bytes = compiled.compression.quality.bytes_fp16
    size = package_weight_bytes(compiled.save(tmp_path / "m.mlpackage"))
    head = kept[0].bytes_fp16
    assert size < 0.27 * (fp16_bytes - head) + head + 64 * 64
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lut4_quality_is_measured_on_the_shipped_weights(lut4):
    compiled, model, args, kwargs, _ = lut4
    q = compiled.compression.quality
    assert len(q.weights) == 7
    # 4-bit k-means on Gaussian weights: ~8-10% relative weight error per tensor, never 0
    assert all(0.03 < w.weight_rel_error < 0.2 for w in q.weights)
    assert all(w.output_rel_error is not None and w.output_rel_error > 0 for w in q.weights)
    assert 0 < q.end_to_end_rel_error < 0.5
    # the measurement runs the converted graph: with the fp16 weights it reproduces the model
    flat = compiled.captured.flat_inputs
    fp16_out = compiled.artifact.run(flat, variant="fp16")[0]
    comp_out = compiled.artifact.run(flat, variant="compressed")[0]
    eager = model(*args, **kwargs).logits
    assert torch.allclose(fp16_out, eager, atol=2e-2, rtol=0)
    rel = float((comp_out - fp16_out).norm() / fp16_out.norm())
    assert rel == pytest.approx(q.end_to_end_rel_error, rel=1e-6)
    # on inputs the compile never saw (other tokens, a padded mask) the swap still runs
    ids = torch.randint(0, 384, (1, SEQ))
    mask = torch.ones(1, SEQ, dtype=torch.long)
    mask[0, :3] = 0
    other = compiled.artifact.run([ids, mask], variant="fp16")[0]
    assert torch.allclose(other, model(ids, attention_mask=mask).logits, atol=2e-2, rtol=0)


def test_lm_quality_reports_agreement_and_kl(lut4):
    compiled = lut4[0]
    prompts = [torch.randint(0, 384, (1, 6)), torch.randint(0, 384, (1, 4))]
    lm = compiled.lm_quality(prompts, new_tokens=8)
    assert lm.tokens == 16 and lm.prompts == 2
    assert 0.5 <= lm.agreement <= 1.0 and lm.mean_kl > 0
    assert compiled.compression.quality.summary()["agreement"] == round(lm.agreement, 4)


def test_lm_agreement_counts_positions():
    torch.manual_seed(1)
    table = torch.randn(50, 10)

    def ref(ids):
        return table[ids.reshape(-1)]

    def flipped(ids):  # disagrees wherever the input token is even
        out = ref(ids).clone()
        even = ids.reshape(-1) % 2 == 0
        out[even] = -out[even]
        return out

    seqs = [torch.arange(0, 12).reshape(1, -1)]
    same = lm_agreement(ref, ref, seqs, [4])
    assert same.agreement == 1.0 and same.mean_kl == pytest.approx(0.0, abs=1e-12)
    half = lm_agreement(ref, flipped, seqs, [4])
    assert (
        half.tokens == 8 and half.agreement == 0.5 and half.first_disagreement == [1]
    )  # ids 3, 4, … predict: 4 is even


def test_int8_is_per_channel_and_with_compression_reuses_the_program(lut4):
    compiled = lut4[0]
    int8 = compiled.with_compression("int8")
    ops = int8.artifact.operations()
    q = [op for op in ops if op.op_type == "constexpr_blockwise_shift_scale"]
    # the 7 projections and the tied table (int8 is asked without keep_lm_head)
    assert len(q) == 8 and not [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    for op in q:  # one scale per output channel: not per block
        assert op.inputs["scale"].val.shape[1:] == (1,) * (op.inputs["scale"].val.ndim - 1)
    assert int8.compression.quality.end_to_end_rel_error < lut4[0].compression.quality.end_to_end_rel_error
    assert 0.45 < int8.compression.quality.size_ratio < 0.55
    assert compiled.compression.options.scheme == "lut4"  # the original is unchanged


# ---------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chunked():
    model, args, kwargs = _llama(layers=3)
    return anefx.compile(model, args, kwargs, max_chunk_mb=4), model


def test_chunks_under_the_cap_chain_to_the_model(chunked, tmp_path):
    compiled, model = chunked
    chunks = compiled.chunks.chunks
    assert len(chunks) >= 2
    out = compiled.save(tmp_path / "llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "anefx-chunks/2" and len(manifest["chunks"]) == len(chunks)
    main = manifest["functions"]["main"]
    available = set(main["inputs"])
    for entry in manifest["chunks"]:
        size = package_weight_bytes(out / entry["file"])
        assert 0 < size <= 4e6 and entry["weight_bytes"] == size
        for i in entry["functions"]["main"]["inputs"]:  # every input comes from the model or an earlier chunk
            assert i["name"] in available, i
        available |= set(entry["functions"]["main"]["outputs"])
    assert main["outputs"] == [{"name": "logits", "from": f"chunk{len(chunks) - 1}"}]
    # each boundary carries the hidden state alone: masks and rotary tables are recomputed from the
    # model's inputs in every chunk, and the next layer's norm input (RMSNorm's cat(x, -x)) is not
    # passed beside x
    for entry in manifest["chunks"][1:]:
        passed = [i["shape"] for i in entry["functions"]["main"]["inputs"] if i["from"] != "model"]
        assert passed == [[1, 320, 1, SEQ]], entry["inputs"]
    # every layer is in exactly one chunk, in order
    layers = [layer for e in manifest["chunks"] for layer in e["layers"]]
    assert layers == sorted(layers) == [0, 1, 2]
    # the chain, in torch, on inputs the compile never saw (other tokens, left padding)
    ids = torch.randint(0, 384, (1, SEQ))
    mask = torch.ones(1, SEQ, dtype=torch.long)
    mask[0, :4] = 0
    got = compiled.chunks.run([ids, mask])[0]
    want = model(ids, attention_mask=mask).logits
    assert torch.allclose(got[0, 4:], want[0, 4:], atol=1e-4, rtol=0)
    # each package holds only its layers' weights: the tied embedding in the first and last only
    convs = [c.package.op_histogram()["conv"] for c in chunks]
    assert sum(convs) == 3 * 7 + 1


def test_ane_report_covers_every_chunk(chunked):
    compiled = chunked[0]
    report = compiled.ane_report
    per_chunk = [sum(c.package.op_histogram().values()) for c in compiled.chunks.chunks]
    assert report.op_count == sum(per_chunk)
    # the embedding's gather is in the first package only, and is named after it
    gathers = [f.op for f in report.findings if f.op_type == "gather"]
    assert gathers and all(op.startswith("chunk0/") for op in gathers), gathers
    assert report.estimate["weight_mib"] > 0


def test_a_failing_chunk_save_leaves_nothing(chunked, tmp_path, monkeypatch):
    compiled = chunked[0]
    last = compiled.chunks.chunks[-1].package

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(last, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        compiled.save(tmp_path / "llama")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Large vocabularies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["argmax", "topk"])
def test_lm_head_split_into_channel_chunks(output):
    from anefx.targets.lm_head import LMHeadOptions

    model, args, kwargs = _llama(layers=1, vocab=300)
    opts = LMHeadOptions(max_channels=128, output=output, k=4)
    compiled = anefx.compile(model, args, kwargs, lm_head=opts)
    ops = compiled.op_histogram()
    assert ops["conv"] == 7 + 3  # the 300-channel head as 128 + 128 + 44
    assert compiled.report.conversion["lm_head"] == {"lm_head_split": 1, "output": output}
    convs = [
        op for op in compiled.artifact.operations() if op.op_type == "conv" and op.outputs[0].shape[1] in (128, 44)
    ]
    assert sorted(op.outputs[0].shape[1] for op in convs) == [44, 128, 128]
    outputs = [o.name for o in compiled.mlmodel.get_spec().description.output]
    assert outputs == {"argmax": ["token"], "topk": ["topk_values", "topk_ids"]}[output]
    # the full logits never leave the model: no output has the vocabulary's size
    shapes = [o.type.multiArrayType.shape for o in compiled.mlmodel.get_spec().description.output]
    assert all(300 not in list(s) for s in shapes)
    # the torch graph keeps its logits
    assert compiled(*args, **kwargs).logits.shape[-1] == 300


def test_small_vocabularies_are_left_alone_by_default():
    model, args, kwargs = _llama(layers=1, vocab=300)
    compiled = anefx.compile(model, args, kwargs, convert=False)
    assert not compiled.artifact.converted  # nothing converted, nothing split
    from anefx.ir.graph import clone_graph_module
    from anefx.targets.lm_head import HARD_LIMIT, split_head

    _, stats = split_head(clone_graph_module(compiled.graph_module), HARD_LIMIT)
    assert stats["lm_head_split"] == 0


# ---------------------------------------------------------------------------------------------
# compile_lm: compression and chunking of the stateful prefill + decode package
# ---------------------------------------------------------------------------------------------

LM_CONTEXT, LM_PREFILL = 64, 16


def _lm_prompts(n=2, length=10, vocab=384):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(n)]


def _hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False, eos_token_id=None
        )
    return [int(t) for t in out[0, prompt.shape[1] :]]


@pytest.fixture(scope="module")
def lm_lut4():
    model, _, _ = _llama(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = anefx.compile_lm(
        model,
        context_length=LM_CONTEXT,
        prefill_length=LM_PREFILL,
        check_tokens=4,
        compression="lut4",
        quality_prompts=_lm_prompts(),
        quality_tokens=12,
    )
    return lm, model, before


def _weight_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.dim() >= 2)


def test_compile_lm_lut4_both_functions_share_one_compressed_weight_file(lm_lut4, tmp_path):
    lm, model, before = lm_lut4
    comp = lm.compression
    per_fn = {}
    for fn in lm.functions:
        shipped = comp.functions[fn].shipped
        # the 7 projections of both layers and the tied embedding / LM head table, all as 4-bit LUTs
        assert len(shipped) == 2 * 7 + 1, [w.param for w in shipped]
        # named as the user's parameters (what keep_fp16 / per_layer patterns match), with their layer
        names = {w.param: w.layer for w in shipped}
        assert (
            names["model.layers.1.mlp.down_proj.weight"] == 1 and names["model.layers.0.self_attn.q_proj.weight"] == 0
        )
        tied = [n for n in names if n in ("model.embed_tokens.weight", "lm_head.weight")]
        assert len(tied) == 1 and names[tied[0]] is None
        assert lm.op_histogram(fn)["constexpr_lut_to_dense"] == len(shipped)
        values = decompressed_weights(comp.functions[fn].model)
        per_fn[fn] = {w.param: values[w.const] for w in shipped}
    # the same tables and indices in both functions (one k-means, shared)
    assert per_fn["prefill"].keys() == per_fn["decode"].keys()
    for param, value in per_fn["decode"].items():
        assert np.array_equal(value, per_fn["prefill"][param]), param
    # saved: one weight file holding the weights once, at ~4/16 of their fp16 bytes
    path = lm.save(tmp_path / "lm.mlpackage")
    bins = list(path.rglob("*.bin"))
    assert len(bins) == 1
    fp16_bytes = 2 * _weight_params(model)
    assert 0.2 * fp16_bytes < package_weight_bytes(path) < 0.3 * fp16_bytes
    import coremltools as ct

    assert ct.utils.load_spec(str(path)).description.metadata.userDefined["anefx.compression"] == "lut4"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched


def test_compile_lm_quality_is_measured_on_the_shipped_weights(lm_lut4):
    lm, model, _ = lm_lut4
    q = lm.compression.lm
    assert q.prompts == 2 and q.tokens == 2 * 12
    assert 0.5 <= q.agreement <= 1.0 and q.mean_kl > 0 and q.max_kl >= q.mean_kl
    summary = lm.compression.summary()
    assert summary["agreement"] == round(q.agreement, 4) and summary["scheme"] == "lut4"
    assert 0.2 < summary["size_ratio"] < 0.3
    # the measurement runs the converted stateful prefill program: with the fp16 weights it computes
    # the model's logits on a sequence spanning several prefill chunks, the compressed weights differ
    ids = _lm_prompts(1, 40)[0]
    want = model(ids).logits[0]
    fp16, comp = lm.prefill_logits(ids, "fp16"), lm.prefill_logits(ids, "compressed")
    assert torch.allclose(fp16, want, atol=2e-2 * float(want.abs().max()), rtol=0)
    rel = float((comp - fp16).norm() / fp16.norm())
    assert 0.01 < rel < 0.5
    assert "agreement" in str(lm.compression)


def test_compile_lm_with_compression_reuses_the_fp16_functions(lm_lut4, tmp_path):
    lm, model, _ = lm_lut4
    int8 = lm.with_compression("int8", prompts=_lm_prompts(), new_tokens=12)
    for fn in int8.functions:
        hist = int8.op_histogram(fn)
        assert hist["constexpr_blockwise_shift_scale"] == 2 * 7 + 1 and hist["constexpr_lut_to_dense"] == 0
    ops = int8.package.operations("decode")
    for op in (op for op in ops if op.op_type == "constexpr_blockwise_shift_scale"):  # per channel, not per block
        scale = op.inputs["scale"].val
        assert scale.shape[1:] == (1,) * (scale.ndim - 1)
    assert int8.compression.lm.agreement >= lm.compression.lm.agreement
    assert int8.compression.lm.mean_kl < lm.compression.lm.mean_kl
    size = package_weight_bytes(int8.save(tmp_path / "int8.mlpackage"))
    assert 0.45 < size / (2 * _weight_params(model)) < 0.55
    assert lm.compression.options.scheme == "lut4" and lm.op_histogram("decode")["constexpr_lut_to_dense"] == 15


@pytest.fixture
def no_lm_capture(monkeypatch):
    import anefx.core.stages as stages
    import anefx.lm.compile as lm_compile

    def boom(*a, **k):
        raise AssertionError("compile_lm started: the error came too late")

    monkeypatch.setattr(lm_compile, "probe_layout", boom)
    monkeypatch.setattr(stages, "capture", boom)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"compression": "int4"}, ["wrong output on the Neural Engine", "lut4"]),
        ({"compression": CompressionOptions(scheme="int8", block_size=16)}, ["per-block", "'int8'"]),
        ({"compression": "lut5"}, ["unknown compression scheme 'lut5'"]),
        ({"compression": "lut6", "convert": False}, ["needs convert=True"]),
        ({"max_chunk_mb": 0.5}, ["impossible", "layer 0", "1.7 MB"]),
    ],
)
def test_compile_lm_refusals_come_before_any_work(kwargs, words, no_lm_capture, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, _, _ = _llama(layers=2)
    with pytest.raises(AnefxError) as info:
        anefx.compile_lm(model, context_length=LM_CONTEXT, prefill_length=LM_PREFILL, **kwargs)
    for w in words:
        assert w in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def lm_chunked():
    model, _, _ = _llama(layers=3)
    layer_mb = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n) * 2 / 1e6
    cap = 1.2 * layer_mb + 0.5  # one layer (and the 0.25 MB table) per chunk
    lm = anefx.compile_lm(model, context_length=LM_CONTEXT, prefill_length=LM_PREFILL, check_tokens=8, max_chunk_mb=cap)
    return lm, model, cap


def test_compile_lm_chunks_hold_their_layers_and_states(lm_chunked, tmp_path):
    lm, _, cap = lm_chunked
    chunks = lm.chunks.chunks
    assert [c.layers for c in chunks] == [[0], [1], [2]]
    assert [list(c.states) for c in chunks] == [[f"key_cache_{i}", f"value_cache_{i}"] for i in range(3)]
    out = lm.save(tmp_path / "lm.mlpackage")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["file"] for e in manifest["chunks"]] == [f"lm_chunk{i}.mlpackage" for i in range(3)]
    import coremltools as ct

    for i, entry in enumerate(manifest["chunks"]):
        size = package_weight_bytes(out / entry["file"])
        assert 0 < size <= cap * 1e6 and entry["weight_bytes"] == size
        spec = ct.utils.load_spec(str(out / entry["file"]))
        functions = {f.name: f for f in spec.description.functions}
        assert set(functions) == {"prefill", "decode"}
        for fn, f in functions.items():
            assert sorted(s.name for s in f.state) == sorted(entry["states"])
            hist = chunks[i].package.op_histogram(fn)
            assert hist["read_state"] == hist["coreml_update_state"] == 2, hist
            assert [x.name for x in f.input] == [x["name"] for x in entry["functions"][fn]["inputs"]]
            assert [x.name for x in f.output] == entry["functions"][fn]["outputs"]
    # the embedding in the first chunk (gather), the LM head (the tied table again) in the last
    assert chunks[0].package.op_histogram("decode")["gather"] == 1
    assert chunks[-1].package.op_histogram("decode")["gather"] == 0
    assert manifest["chunks"][-1]["functions"]["decode"]["outputs"] == ["logits"]
    # every value input comes from the caller or an earlier chunk
    for fn in ("prefill", "decode"):
        available = {"input_ids", "position_ids"}
        for entry in manifest["chunks"]:
            assert {x["name"] for x in entry["functions"][fn]["inputs"]} <= available
            available |= set(entry["functions"][fn]["outputs"])
        for entry in manifest["chunks"][:-1]:  # the hidden state alone crosses each boundary
            assert len(entry["functions"][fn]["outputs"]) == 1, entry["functions"][fn]
        # the ANE report reads every package of the chain
        report = lm.ane_report(fn)
        assert report.op_count == sum(sum(c.package.op_histogram(fn).values()) for c in chunks)
        assert {f.op.split("/")[0] for f in report.findings if f.op_type == "gather"} == {"chunk0"}


def test_compile_lm_chain_generates_like_the_model(lm_chunked):
    lm, model, _ = lm_chunked
    assert lm.check.runtime == "target" and lm.check.agreement >= 0.9  # the chain of fp16 packages, executed
    assert set(lm.reports["decode"].artifact) == {f"chunk{c.index}" for c in lm.chunks.chunks}
    whole = anefx.compile_lm(model, context_length=LM_CONTEXT, prefill_length=LM_PREFILL, convert=False, check_tokens=0)
    for seed in (1, 2):  # prompts the compile never saw, spanning two prefill chunks
        prompt = _lm_prompts(1, 20 + seed)[0]
        chained = lm.generate(prompt, 12, eos_token_id=None).new_tokens
        assert chained == whole.generate(prompt, 12, eos_token_id=None).new_tokens == _hf_greedy(model, prompt, 12)


def test_both_front_ends_ship_one_artifact_type(chunked, lm_chunked, tmp_path):
    """A chunked compile and a chunked compile_lm: the same artifact type, run by the same runner,
    saved with the same manifest format, read back the same way; ``anefx.load(folder)`` runs the
    saved chain with the target's executor (the MIL interpreter) as the compile's own artifact runs
    in memory, within fp16 of the rewritten graphs."""
    from anefx.targets.artifact import Artifact
    from anefx.targets.executor import ChainProgram

    compiled, lm = chunked[0], lm_chunked[0]
    assert type(compiled.chunks) is type(lm.chunks) is Artifact
    assert compiled.chunks.functions == ["main"] and lm.chunks.functions == ["prefill", "decode"]
    a = json.loads((compiled.save(tmp_path / "m") / "manifest.json").read_text())
    b = json.loads((lm.save(tmp_path / "lm") / "manifest.json").read_text())
    assert a["format"] == b["format"] == "anefx-chunks/2" and a.keys() == b.keys()
    assert a["chunks"][0].keys() == b["chunks"][0].keys()
    assert a["functions"]["main"].keys() == b["functions"]["decode"].keys()
    # read back: the packages and their wiring (no torch graphs: they run with the target's executor)
    for saved, made in ((tmp_path / "m", compiled.chunks), (tmp_path / "lm", lm.chunks)):
        loaded = Artifact.load(saved)
        assert loaded.chunked and loaded.functions == made.functions and loaded.inputs == made.inputs
        for fn in made.functions:
            assert loaded.op_histogram(fn) == made.op_histogram(fn)
        shapes = {s: spec.shape for s, spec in made.states.items()}
        assert {s: spec.shape for s, spec in loaded.states.items()} == shapes
        with pytest.raises(AnefxError, match="no PyTorch graphs"):
            loaded.run([torch.zeros(1)] * len(made.inputs[made.default]))

    # compile's chain: the saved folder and the compile itself, through the one chain runner
    program, in_memory = anefx.load(tmp_path / "m"), anefx.load(compiled)
    assert isinstance(program, ChainProgram) and len(program.parts) == len(compiled.chunks.chunks) >= 2
    assert program.runtime == "mil" and list(program.inputs()) == compiled.chunks.inputs["main"]
    assert program.source == str(tmp_path / "m")
    examples = compiled.chunks.programs[0].functions["main"].value_examples()
    feed = dict(zip(compiled.chunks.inputs["main"], examples, strict=True))
    (want,) = compiled.chunks.run(feed)
    got = program(feed)["logits"]
    np.testing.assert_array_equal(got, in_memory(feed)["logits"])  # the same bytes, run the same way
    assert float(np.abs(got - want.numpy()).max() / want.abs().max()) < 1e-2

    # compile_lm's chain: prefill then decode, each chunk keeping its layers' caches
    program = anefx.load(tmp_path / "lm")
    state = program.make_state("prefill")
    assert list(state) == [f"{kind}_cache_{i}" for i in range(3) for kind in ("key", "value")]
    step = lm.step("torch")
    prompt = _lm_prompts(1, 20)[0]
    ids = prompt[0, :LM_PREFILL].reshape(1, -1).to(torch.int32)
    positions = torch.arange(LM_PREFILL, dtype=torch.int32).reshape(1, -1)
    calls = [("prefill", ids, positions), ("decode", prompt[:, LM_PREFILL : LM_PREFILL + 1], positions[:, -1:] + 1)]
    for fn, i, p in calls:
        want = step(fn, i.to(torch.int32), p)
        got = program({"input_ids": i, "position_ids": p}, function=fn, state=state)["logits"]
        assert float(np.abs(got - want.numpy()).max() / want.abs().max()) < 1e-2, fn
    written = np.abs(state["key_cache_2"]).sum(axis=(0, 1, 2))  # the last chunk's cache, by position
    assert (written[: LM_PREFILL + 1] > 0).all() and not written[LM_PREFILL + 1 :].any()


# ---------------------------------------------------------------------------------------------
# Real trained weights: SmolLM2-135M-Instruct's first two layers (the whole model's figures — lut6
# / lut4 / int8 side by side, max_chunk_mb=100 — are in ``examples/benchmark.py --lm-compression``)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_2_layers():
    """SmolLM2's trained weights, truncated to its first 2 of 30 layers (the tied 49152 x 576 table,
    final norm and head are the real ones), compiled compressed and chunked in one go.

    lut6 per tensor: coremltools' k-means takes ~0.25 s per 32-channel group here (~6 min for the
    table's 1,536 groups, ~25 min for the whole model) against ~17 s for the table as one tensor,
    at nearly the same weight error (3.5% vs 3.0% on the table)."""
    from examples.models import smollm2_chat_ids, smollm2_model_and_tokenizer

    model, tok = smollm2_model_and_tokenizer()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    prompts = [smollm2_chat_ids(tok, p) for p in ("What is the capital of France?", "Write a haiku about the sea.")]
    lm = anefx.compile_lm(
        model,
        context_length=64,
        prefill_length=32,
        check_prompt=prompts[0],
        check_tokens=8,
        compression=CompressionOptions(scheme="lut6", granularity="per_tensor"),
        max_chunk_mb=25,
        quality_prompts=prompts,
        quality_tokens=16,
    )
    return lm, model, prompts


def test_smollm2_layers_compressed_and_chunked(smollm2_2_layers, tmp_path):
    lm, model, prompts = smollm2_2_layers
    # two packages under the cap: the table (embedding) with layer 0, layer 1 with the head (the table again)
    assert [c.layers for c in lm.chunks.chunks] == [[0], [1]]
    out = lm.save(tmp_path / "smollm2")
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = [package_weight_bytes(out / e["file"]) for e in manifest["chunks"]]
    assert all(s <= 25e6 for s in sizes)
    # 6-bit indices: the saved weights at <= 0.42x their fp16 bytes (the table counted in both packages)
    table = model.model.embed_tokens.weight.numel()
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    assert sum(sizes) <= 0.42 * 2 * (2 * table + layers)
    for c in lm.chunks.chunks:
        for fn in lm.functions:
            hist = c.package.op_histogram(fn)
            assert hist["constexpr_lut_to_dense"] == 7 + 1, hist  # the layer's projections and the table
    # quality on the shipped weights through the chain: 2 chat prompts x 16 new tokens. Two of 30
    # layers make a fragile model (measured: agreement 0.81, mean KL 0.13); the whole model's lut6
    # figures are the benchmark's
    q = lm.compression.lm
    assert q.tokens == 32 and q.agreement >= 0.7 and 0 < q.mean_kl < 0.3
    assert lm.compression.summary()["chunks"] == 2
    # the chain of fp16 packages, executed, generates the truncated model's own greedy tokens
    assert lm.check.runtime == "target" and lm.check.agreement >= 0.75
    new = lm.generate(prompts[1], 8, eos_token_id=None).new_tokens
    assert new == _hf_greedy(model, prompts[1], 8)
