"""``compile_lm`` on encoder-decoder models (issue 23): Whisper (80 mel bins), T5, BART, small configs
with random weights, compiled once each (convert=True) through the one core.

Done-when figures: greedy tokens equal to ``generate(do_sample=False)`` for 32 new tokens on two
inputs the compile never saw (a padded source for the text models); the package holds ``encode``,
``prefill`` and ``decode`` with the self- and cross-attention states; no ``linear`` or ``matmul`` on
a weight; the decode step has no transpose, and its reshapes grow by six per decoder layer, each a
view of one token's channels that keeps the last axis (the query and the output of the self- and
cross-attention, the new K and V columns): no layout change per layer copies memory.

BART is compiled as a chain under a size cap (``max_chunk_mb``): its encoder is a chunk of its own,
as WhisperKit ships Whisper's, and every test above runs on the chain (its compression included)."""

from __future__ import annotations

import collections
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import anefx
from anefx.ir.errors import AnefxError
from anefx.lm.generate import greedy
from anefx.lm.processors import logits_processor
from anefx.lm.seq2seq import CompiledEncoderDecoder
from examples.models import tiny_bart, tiny_t5, tiny_whisper

CONTEXT = 64
NEW_TOKENS = 32
FACTORIES = {"whisper": tiny_whisper, "t5": tiny_t5, "bart": tiny_bart}
#: BART's cap: its encoder (0.18 MB of fp16 weights) and its decoder (0.3 MB) each fit, not both
BART_CHUNK_MB = 0.4


def _compile(name: str, **kwargs) -> tuple[torch.nn.Module, CompiledEncoderDecoder]:
    model = FACTORIES[name]()
    extra = {} if name == "whisper" else {"source_length": 20}
    if name == "bart":
        extra["max_chunk_mb"] = BART_CHUNK_MB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, anefx.compile_lm(model, context_length=CONTEXT, **extra, **kwargs)


_BUILT: dict[str, tuple] = {}


def _built(name: str, workdir: Path):
    """One compile per model for the whole module; Whisper's is the speech example's own run
    (``examples/speech_to_text.py``: synthetic audio → WhisperFeatureExtractor → the package)."""
    if name not in _BUILT:
        if name == "whisper":
            from examples import speech_to_text

            out = workdir / "whisper.mlpackage"
            result = speech_to_text.main(["--out", str(out), "--new-tokens", "12"])
            assert result["tokens"] == result["reference"] and out.is_dir()
            _BUILT[name] = result["model"], result["compiled"]
        else:
            _BUILT[name] = _compile(name)
    return _BUILT[name]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("seq2seq")


@pytest.fixture(scope="module", params=list(FACTORIES))
def compiled(request, workdir):
    return request.param, *_built(request.param, workdir)


def _reference(model, inputs, mask, n):
    kwargs = {} if mask is None else {"attention_mask": mask}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = model.generate(
            inputs, **kwargs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    steps = len(out.logits)
    return [int(t) for t in out.sequences[0, -steps:]], [lg[0] for lg in out.logits]


def _unseen_inputs(name: str):
    """Two inputs per model that the compile never saw: (compiled's input, its mask, HF's input, HF's mask)."""
    if name == "whisper":
        gen = torch.Generator().manual_seed(99)
        shape = (1, 80, 100)  # the example's: one second of audio
        feats = [torch.randn(shape, generator=gen), 3 * torch.randn(shape, generator=gen)]
        return [(f, None, f, None) for f in feats]
    ids = torch.randint(3, 256, (2, 15), generator=torch.Generator().manual_seed(98))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # the second source is padded in the batch HF generates
    return [(ids[r : r + 1, : int(mask[r].sum())], None, ids[r : r + 1], mask[r : r + 1]) for r in range(2)]


def test_greedy_tokens_equal_generate_on_unseen_inputs(compiled):
    name, model, lm = compiled
    assert lm.check is not None and lm.check.tokens_equal
    runs = []
    for x, mask, hf_x, hf_mask in _unseen_inputs(name):
        ref_tokens, ref_logits = _reference(model, hf_x, hf_mask, NEW_TOKENS)
        out = lm.generate(x, attention_mask=mask, max_new_tokens=NEW_TOKENS)
        assert out.new_tokens == ref_tokens
        assert out.sequences[0, : -len(out.new_tokens)].tolist() == [model.generation_config.decoder_start_token_id]
        for mine, ref in zip(out.logits, ref_logits, strict=True):
            torch.testing.assert_close(mine, ref, atol=1e-3 * float(ref.abs().max()), rtol=1e-3)
        runs.append(out.new_tokens)
    assert runs[0] != runs[1] and max(len(set(r)) for r in runs) >= 8  # the input steers varied tokens


def _weight_products(lm, function: str) -> list[str]:
    """``linear`` ops, and ``matmul`` ops with a constant operand, of one converted function."""
    found = []
    for op in lm.artifact.operations(function):
        if op.op_type == "linear" or (
            op.op_type == "matmul" and any(v.op is not None and v.op.op_type == "const" for v in (op.x, op.y))
        ):
            found.append(op.name)
    return found


def test_package_functions_states_and_ane_form(compiled, tmp_path):
    name, _, lm = compiled
    layers = len(lm.layout.decoder.layers)
    assert lm.functions == ["encode", "prefill", "decode"]
    path = lm.save(tmp_path / f"{name}.mlpackage")  # BART's chain: the folder ``bart/``
    assert path.is_dir() and (path / "manifest.json").is_file() == (name == "bart")
    program = anefx.load(path)
    assert program.functions == ["encode", "prefill", "decode"]
    states = [*(f"{k}_{i}" for k in ("key_cache", "value_cache", "cross_key", "cross_value") for i in range(layers))]
    for fn in program.functions:  # one state object serves the three functions
        assert sorted(program.states(fn)) == sorted([*states, "encoder_mask"])
    assert list(program.inputs("decode")) == ["input_ids", "position_ids"]
    meta = lm.metadata
    assert meta["anefx.functions"] == "encode,prefill,decode"
    assert json.loads(meta["anefx.decoder_start_token_ids"]) == [lm.generation_config.decoder_start_token_id]
    assert set(json.loads(meta["anefx.inputs"])) == {"encode", "prefill", "decode"}
    for fn in lm.functions:
        assert _weight_products(lm, fn) == [], fn
        histogram = lm.op_histogram(fn)
        assert histogram["conv"] > 0
    decode = lm.op_histogram("decode")
    assert decode["coreml_update_state"] == 2 * layers  # the self-attention caches only; cross states read
    assert decode["read_state"] == 4 * layers + 1
    # the self-attention caches are a causal LM's (keys-last): each written by one single-column
    # slice_update; they and the cross states (keys-last too) are read as they lie by the attention
    # products: no transpose, no per-head split, no per-head score einsum
    assert decode["slice_update"] == 2 * layers
    assert decode["transpose"] == decode["split"] == decode["einsum"] == 0, decode
    assert lm.reports["decode"].record("attention_bc1s").stats["keys_last"] == 2 * layers
    for fn in lm.functions:
        assert lm.reports[fn].guard is not None
    if name == "whisper":  # the convolutional stem stays convolutional in (B, C, 1, T)
        convs = [op for op in lm.artifact.operations("encode") if op.op_type == "conv"]
        assert [tuple(c.x.shape) for c in convs[:2]] == [(1, 80, 1, 100), (1, 64, 1, 100)]
        assert lm.layout.encoder_length == 50 and lm.layout.cross_length == 64


def _decode_layout_changes(name: str, layers: int) -> tuple[collections.Counter, int]:
    """The decode step of ``name`` with ``layers`` decoder layers rewritten, not converted: its MIL
    transposes and reshapes as the guard counts them (:func:`anefx.driver.guard.layout_changes`) and
    the largest tensor one of them reads."""
    from anefx.driver.guard import layout_change, layout_changes
    from anefx.lm.encoder_decoder import probe_encoder_decoder, step_functions
    from anefx.lm.seq2seq import _random_states

    model = FACTORIES[name](layers=layers)
    layout = probe_encoder_decoder(model, CONTEXT, source_length=None if name == "whisper" else 20)
    _, step = step_functions(model, layout)
    gen = torch.Generator().manual_seed(0)
    states = _random_states(layout, gen, layout.cross_length // 2)
    ids, positions = torch.tensor([[5]], dtype=torch.int32), torch.tensor([[7]], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = anefx.compile(step, (ids, positions, *states), validate="lint", convert=False)
    gm = compiled.build.functions[compiled.build.artifact.default].graph_module
    largest = max(n.all_input_nodes[0].meta["val"].numel() for n in gm.graph.nodes if layout_change(n))
    return layout_changes(gm), largest


def test_decode_layout_changes_per_decoder_layer_move_one_token(compiled):
    """The shipped decode program (the fixture's, 2 decoder layers): no transpose or reshape reads a
    state-sized tensor (the self-attention caches and the cross states are read in place,
    keys-last). Two more decoder layers add no transpose and at most six reshapes each, all of one
    token's channels (self-attention: the new K and V columns, which keep their last axis, and the
    query to heads, the output back; cross-attention: the query and the output), counted on the
    rewritten graphs (no conversion)."""
    name, _, lm = compiled
    layers = len(lm.layout.decoder.layers)
    kv = [s for n, s in lm.layout.states.items() if n != "encoder_mask"]
    smallest = min(math.prod(s) for s in kv)
    changes = [op for op in lm.artifact.operations("decode") if op.op_type in ("transpose", "reshape")]
    assert changes and max(math.prod(op.inputs["x"].shape) for op in changes) < smallest
    (two, largest_two), (four, largest_four) = (
        _decode_layout_changes(name, layers),
        _decode_layout_changes(name, layers + 2),
    )
    assert lm.op_histogram("decode")["transpose"] == two["transpose"] == four["transpose"], (two, four)
    assert four["reshape"] - two["reshape"] <= 6 * 2, (two, four)
    assert max(largest_two, largest_four) < smallest


def _layout_ops(lm) -> tuple[collections.Counter, int]:
    """The decode program's MIL ``transpose``/``reshape`` ops by (type, copies memory in the padded
    layout: :func:`anefx.analysis.layout.moves_data`), and the bytes the traffic estimate charges them."""
    from anefx.analysis.layout import moves_data

    found: collections.Counter = collections.Counter()
    for op in lm.artifact.operations("decode"):
        if op.op_type in ("transpose", "reshape"):
            perm = [int(p) for p in op.inputs["perm"].val] if op.op_type == "transpose" else None
            before, after = (tuple(int(d) for d in v.shape) for v in (op.inputs["x"], op.outputs[0]))
            found[op.op_type, moves_data(before, after, perm)] += 1
    charged = sum(o.total for o in lm.traffic("decode").ops if o.op_type in ("transpose", "reshape"))
    return found, charged


def test_decode_layout_changes_per_decoder_layer_are_views():
    """Whisper at 2 and 4 decoder layers, the shipped decode programs: each added decoder layer adds
    no transpose and six reshapes, every one a view that keeps the last axis (the new K and V
    columns, the self- and cross-attention queries (B, H·D, 1, 1) → (B, H, D, 1) read by the score
    product's transpose_x, their outputs (B, H, D, 1) back); the reshapes that copy memory (the
    embedding in, the logits out) are the same at both depths, and the traffic estimate charges the
    layout changes nothing more."""
    programs = {}
    for layers in (2, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = anefx.compile_lm(tiny_whisper(layers=layers), context_length=CONTEXT, check_tokens=0)
        programs[layers] = _layout_ops(lm)
    (two, bytes_two), (four, bytes_four) = programs[2], programs[4]
    assert two["transpose", True] == two["transpose", False] == 0, two
    grown = {k: (four[k] - two[k]) / 2 for k in set(two) | set(four)}
    assert grown == {("reshape", False): 6, ("reshape", True): 0}, (two, four)
    assert 0 < two["reshape", True] <= 3  # once per step: the token's embedding in, the logits out
    assert bytes_four == bytes_two > 0


def test_whisper_package_runs_on_the_mil_interpreter(workdir):
    """The saved program itself (fp16, anefx's MIL interpreter): the same tokens as the rewritten
    graphs for an input the compile never saw."""
    _, lm = _built("whisper", workdir)
    feats = torch.randn(1, 80, 100, generator=torch.Generator().manual_seed(5))
    torch_run = lm.generate(feats, max_new_tokens=12)
    target = lm.generate(feats, max_new_tokens=12, runtime="target")
    assert target.new_tokens == torch_run.new_tokens
    worst = max(float((a - b).abs().max()) for a, b in zip(target.logits, torch_run.logits, strict=True))
    assert worst < 0.1


def test_errors():
    model = tiny_bart()
    with pytest.raises(AnefxError, match="source_length"):
        anefx.compile_lm(model, context_length=CONTEXT, convert=False)
    with pytest.raises(AnefxError, match="above the decoder's 128 positions"):
        anefx.compile_lm(model, context_length=256, source_length=20, convert=False)
    # an impossible cap names the layer of its stack (the decoder's layer 0, not the encoder's)
    with pytest.raises(AnefxError, match=r"impossible: layer 0 \(model\.decoder\.layers\.0\) alone holds 0\.1 MB"):
        anefx.compile_lm(model, context_length=CONTEXT, source_length=20, max_chunk_mb=0.05)
    with pytest.raises(AnefxError, match="for encoder-decoder models"):
        from examples.models import tiny_llama_lm

        anefx.compile_lm(tiny_llama_lm(), source_length=20, convert=False)


def test_compression_measured_on_the_shipped_weights(workdir):
    """The three functions compressed together (one k-means/quantization, each weight stored once),
    the quality measured as for causal LMs: greedy agreement and mean KL against the fp16 weights."""
    _, lm = _built("bart", workdir)
    small = lm.with_compression("int8", new_tokens=8)
    quality = small.compression.lm
    assert quality is not None and quality.prompts == 2 and quality.tokens == 16
    assert quality.agreement >= 0.75 and quality.mean_kl < 0.05
    assert small.weight_bytes() < 0.6 * lm.weight_bytes()
    assert set(small.compression.functions) == {"encode", "prefill", "decode"}


def test_bart_chain_encoder_is_its_own_chunk(workdir, tmp_path):
    """The chain WhisperKit-style: chunk 0 holds the encoder and only ``encode``; the decoder chunk
    holds the three functions (``encode`` there writes each layer's cross-attention K/V) and every
    state. Saved as a folder, ``anefx.load`` runs it as one program: encode, prefill, decode on the
    MIL interpreter (fp16) give the tokens of the chain run in memory (``runtime="target"``), and
    logits within fp16 error of the rewritten graphs', on an input the compile never saw. The
    compile's artifact check and end-to-end check executed the packages (each chunk, each function)."""
    model, lm = _built("bart", workdir)
    chunks = lm.artifact.chunks
    assert [c.layers for c in chunks] == [[0, 1], [2, 3]]  # encoder layers 0-1, decoder layers 0-1
    assert [list(c.functions) for c in chunks] == [["encode"], ["encode", "prefill", "decode"]]
    assert chunks[0].states == {} and len(chunks[1].states) == 4 * 2 + 1
    # the artifact check executed every function of every chunk that holds it, as for causal LMs
    checked = {fn: sorted(lm.reports[fn].artifact) for fn in lm.functions}
    assert checked == {"encode": ["chunk0", "chunk1"], "prefill": ["chunk1"], "decode": ["chunk1"]}
    assert all(r["ok"] for fn in lm.functions for r in lm.reports[fn].artifact.values())
    assert lm.check.runtime == "target" and lm.check.agreement >= 0.75
    encoder = {n for n, _ in model.named_parameters() if ".encoder.layers." in n}
    held = [set(h.param_names.values()) for h in (c.functions["encode"] for c in chunks)]
    assert encoder <= held[0] and not encoder & held[1]
    folder = lm.save(tmp_path / "bart")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [sorted(c["functions"]) for c in manifest["chunks"]] == [["encode"], ["decode", "encode", "prefill"]]
    assert manifest["default_function"] == "decode"

    program = anefx.load(folder)
    assert program.functions == ["encode", "prefill", "decode"] and program.default_function == "decode"
    state = program.make_state("encode")
    ids = torch.randint(3, 256, (1, 13), generator=torch.Generator().manual_seed(7))
    program(lm.encoder_inputs(ids), function="encode", state=state)

    def step(function, token_ids, positions):
        given = {"input_ids": token_ids, "position_ids": positions}
        return torch.from_numpy(program(given, function=function, state=state)["logits"]).float()

    start = [model.generation_config.decoder_start_token_id]
    process = logits_processor(lm.generation_config, len(start), 12, [])  # generate's processors
    loaded = greedy(step, start, 12, lm.prefill_length, lm.context_length, set(), front_pad=False, process=process)
    in_memory = lm.generate(ids, max_new_tokens=12, eos_token_id=None, runtime="target")
    assert loaded.new_tokens == in_memory.new_tokens and len(set(loaded.new_tokens)) >= 4
    rewritten = lm.decoder_logits(ids, None, torch.tensor([start + loaded.new_tokens[:-1]]))
    scale = float(rewritten.abs().max())
    assert float((torch.stack(loaded.logits) - rewritten).abs().max()) < 0.02 * scale


@pytest.fixture(scope="module")
def whisper_two_decoder_chunks():
    model = tiny_whisper(layers=4, frames=64)
    return model, anefx.compile_lm(model, context_length=32, check_tokens=8, max_chunk_mb=0.28)


def _storages(tensors) -> dict[int, int]:
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_chunks_are_checked_on_their_functions_sets_carried_through_the_chain(whisper_two_decoder_chunks):
    """Each chunk's validator holds its function's input sets carried through the chain, not sets
    of its own: a model input or a state is the function's tensor in every chunk that reads it, and a
    value crossing a boundary is computed once per set (the later chunk's input; the earlier chunk's
    references past the example set are recomputed when a check reads them, not held). The chunks'
    validators hold fewer bytes than validators drawing their own sets, and the artifact check ran
    every chunk on all five sets."""
    from anefx.driver.validate import Validator

    _, lm = whisper_two_decoder_chunks
    chunks = lm.artifact.chunks
    for fn in ("prefill", "decode"):
        holding = [c.functions[fn] for c in chunks if fn in c.functions]
        assert len(holding) == 2
        names = holding[0].validator.set_names
        assert len(names) == 5 and all(h.validator.set_names == names for h in holding)
        shared = [n for n in holding[1].input_names if n in holding[0].input_names]
        crossing = [n for n in holding[1].input_names if n in holding[0].output_names]
        relayed = [n for n in crossing if n.startswith("encoder_mask_from_chunk")]
        assert "position_ids" in shared and len(relayed) == 1 and len(crossing) >= 2  # the mask, the hidden state
        for k in range(5):
            first = dict(zip(holding[0].input_names, holding[0].validator.input_sets[k]))
            later = dict(zip(holding[1].input_names, holding[1].validator.input_sets[k]))
            made = dict(zip(holding[0].output_names, holding[0].validator.references[k]))
            assert all(later[n] is first[n] for n in shared)
            assert all(torch.equal(later[n], made[n]) for n in crossing)
            # each chunk's reference is its own graph's outputs on those inputs; past the example
            # set, computed when read (not held: a new tensor at each read)
            got = holding[1].graph_module(*holding[1].validator.input_sets[k])
            assert all(torch.equal(a, b) for a, b in zip(got, holding[1].validator.references[k]))
            assert (holding[1].validator.references[k][0] is holding[1].validator.references[k][0]) == (k == 0)
        assert all(lm.reports[fn].artifact[f"chunk{c.index}"]["input_sets"] == 5 for c in chunks if fn in c.functions)
        # bytes held by the chunks' validators (unique storages) vs validators drawing their own sets
        held = _storages(t for h in holding for s in (*h.validator.input_sets, h.validator.references[0]) for t in s)
        own = [Validator(h.graph_module, list(h.example_args), h.validator.options) for h in holding]
        drawn = _storages(t for v in own for s in (*v.input_sets, *v.references) for t in s)
        assert sum(held.values()) < sum(drawn.values())


def test_whisper_decoder_across_chunks_relays_the_encoder_mask(whisper_two_decoder_chunks, tmp_path, monkeypatch):
    """A Whisper whose decoder spans two chunks (Whisper-large-v3 at the default cap: 32 decoder
    layers in two packages). Every decoder layer's cross-attention reads the ``encoder_mask`` state,
    and a state lives in one chunk: the first decoder chunk reads it and passes it on
    (``encoder_mask_from_chunk2``), the later chunk takes it as an ordinary input. The chain, saved
    and loaded, generates HF's greedy tokens on an input the compile never saw."""
    model, lm = whisper_two_decoder_chunks
    chunks = lm.artifact.chunks
    decoder = [i for i, c in enumerate(chunks) if "decode" in c.functions]
    assert len(decoder) == 2 and [list(chunks[i].functions) for i in decoder] == [["encode", "prefill", "decode"]] * 2
    first, later = decoder
    assert [i for i, c in enumerate(chunks) if "encoder_mask" in c.states] == [first]
    relayed = f"encoder_mask_from_chunk{first}"
    for fn in ("prefill", "decode"):
        assert relayed in chunks[first].functions[fn].output_names
        assert relayed in chunks[later].functions[fn].input_names
        assert "encoder_mask" not in chunks[later].functions[fn].states_in.values()
    assert all(r["ok"] for fn in lm.functions for r in lm.reports[fn].artifact.values())
    # the chunks were checked on their own sets (prefill and decode: example, random, 3 stress); the
    # whole graphs' validators keep only their example once split
    assert {fn: lm.reports[fn].artifact[f"chunk{later}"]["input_sets"] for fn in ("prefill", "decode")} == {
        "prefill": 5,
        "decode": 5,
    }
    assert all(len(b.result.validator.input_sets) == 1 for b in lm.build.functions.values())
    # each chunk's functions were released to their packages: their op histograms were counted
    # once (by the compile's report) and kept; a function's ops are read back once for repeated asks
    import anefx.compat.coremltools as ctc

    ctc.forget_read_back()
    reads, read = [], ctc.program_from_spec
    monkeypatch.setattr(ctc, "program_from_spec", lambda *a, **k: reads.append(1) or read(*a, **k))
    histograms = {fn: lm.op_histogram(fn) for fn in lm.functions}
    assert reads == [] and histograms["decode"]["read_state"] > 0
    assert histograms == {fn: dict(lm.reports[fn].conversion["ops"]) for fn in lm.functions}
    package = chunks[later].package
    assert package.operations("decode") and [op.op_type for op in package.operations("decode")] and len(reads) == 1
    feats = 2 * torch.randn(1, 80, 64, generator=torch.Generator().manual_seed(5))
    want, _ = _reference(model, feats, None, 16)
    program = anefx.load(lm.save(tmp_path / "whisper"))
    state = program.make_state("encode")
    program(lm.encoder_inputs(feats), function="encode", state=state)

    def step(function, token_ids, positions):
        given = {"input_ids": token_ids, "position_ids": positions}
        return torch.from_numpy(program(given, function=function, state=state)["logits"]).float()

    start = [model.generation_config.decoder_start_token_id]  # no languages: the start token alone
    process = logits_processor(lm.generation_config, len(start), 16, [])
    loaded = greedy(step, start, 16, lm.prefill_length, lm.context_length, set(), front_pad=False, process=process)
    assert loaded.new_tokens == lm.generate(feats, max_new_tokens=16, eos_token_id=None).new_tokens
    assert loaded.new_tokens == want[-16:]


def test_t5_whose_encoder_amplifies_fp16_rounding_compiles_within_its_fp16_floor():
    """A 6-layer T5 (unscaled attention, logits up to ~30) rounds its cross states in fp16 by more
    than the fixed tolerance (0.03): PyTorch's own ``.half()`` errs as much (at 4 layers the first
    cross state errs 0.031, too near 0.03 for an assertion on another CPU; at 6, 0.04-0.07). The
    check judges those outputs against the graph executed with every value rounded to fp16: the
    program errs about as fp16 itself does (a converter bug errs by the whole scale), so the package
    ships, its teacher-forced agreement measured."""
    layers = 6
    model = tiny_t5(layers=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = anefx.compile_lm(model, context_length=CONTEXT, source_length=20)
    encode = lm.reports["encode"].artifact["encode"]
    judged = {k: v for k, v in encode["outputs"].items() if "fp16_floor" in v}
    cross = {f"state:cross_{kv}_{i}" for kv in ("key", "value") for i in range(layers)}
    assert encode["ok"] and judged and set(judged) <= cross
    for v in judged.values():
        assert encode["tolerance"] < v["rel_error"] <= v["tolerance"] == min(0.1, 2 * v["fp16_floor"])
        assert 0.5 * v["fp16_floor"] < v["rel_error"] < 1.5 * v["fp16_floor"]  # fp16's own error, not more
    assert lm.check.runtime == "target" and lm.check.agreement >= 0.75
    # the graphs handed to the converter are exact: the rewritten model generates HF's tokens
    for x, mask, hf_x, hf_mask in _unseen_inputs("t5"):
        tokens = lm.generate(x, attention_mask=mask, max_new_tokens=16).new_tokens
        assert tokens == _reference(model, hf_x, hf_mask, 16)[0]


def test_example_mode_holds_the_example_references_only_after_the_passes(monkeypatch):
    """The eager outputs of the step functions (validated against their captured graphs) are
    released after their passes. In ``validate="example"`` (the mode of Whisper-large-v3, whose
    references over its three step functions are ~2.3 GB) each function's validator keeps only the
    example set's reference outputs once its passes are done: the other sets' are its captured
    graph run again when a check reads them (a new tensor at each read, the same values), and the
    artifact check still runs every set."""
    from anefx.core import stages
    from anefx.driver.validate import Recomputed, run_flat

    last: list[str] = [""]
    collected: list[str] = []
    collect = stages.collect
    monkeypatch.setattr(stages, "collect", lambda: (collected.append(last[0]), collect()))

    def progress(event):
        if event.kind == "end":
            last[0] = event.name

    model = tiny_whisper(frames=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = anefx.compile_lm(model, context_length=32, check_tokens=4, validate="example", progress=progress)
    # the cyclic garbage (discarded graphs, converted MIL programs) is collected at the stage boundaries
    assert collected == ["passes"] * 4 + ["convert.decode"]  # each function's passes, before and after converting
    for fn, built in lm.build.functions.items():
        for result in (built.result, built.unguarded):
            refs = result.validator.references
            assert isinstance(refs, Recomputed) and len(refs) == len(result.validator.input_sets) >= 2
            assert refs[1][0] is not refs[1][0] and refs[0][0] is refs[0][0]
            again = run_flat(built.captured.graph_module, result.validator.input_sets[1])
            assert all(torch.equal(a, b) for a, b in zip(refs[1], again, strict=True))
        assert lm.reports[fn].artifact[fn]["input_sets"] == len(built.result.validator.set_names)
        # validated against the captured graph: the eager outputs (read for the tolerances' scale) are dropped
        with pytest.raises(AnefxError, match=r"released: .* validated against its captured graph"):
            list(built.captured.reference_outputs)


def test_the_end_to_end_check_holds_one_chunk_of_a_chain_at_a_time(whisper_two_decoder_chunks, monkeypatch):
    """The end-to-end check runs the chain's packages with each chunk loaded for its call and
    released after it (Whisper-large-v3's four chunks: 3.1 GB of fp16 weights, on top of what the
    compile holds then), with the same tokens and logits as the chain loaded whole."""
    import weakref

    from anefx.targets.mil import MILProgram

    _, lm = whisper_two_decoder_chunks
    x = torch.randn((1, 80, 64), generator=torch.Generator().manual_seed(5))
    whole = lm.generate(x, max_new_tokens=3, runtime="target")
    live: list = []
    most = []
    init = MILProgram.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        live[:] = [r for r in live if r() is not None]
        live.append(weakref.ref(self))
        most.append(len(live))

    small = lm._checked_view("target")._executors["target"]  # a chain of a few MB: each chunk loaded once
    assert all(type(part) is MILProgram for part in small.parts)
    del small
    monkeypatch.setattr(MILProgram, "__init__", tracked)
    view = lm._checked_view("target", one_part_at_a_time=True)  # the rule above 1 GB of weights
    chunked = view.generate(x, max_new_tokens=3, runtime="target")
    assert len(lm.artifact.chunks) >= 3 and len(most) > len(lm.artifact.chunks) and max(most) == 1
    assert chunked.new_tokens == whole.new_tokens
    assert all(torch.equal(a, b) for a, b in zip(chunked.logits, whole.logits, strict=True))


def test_loading_a_chunk_leaves_no_weights_in_cycles(whisper_two_decoder_chunks, monkeypatch):
    """The MIL program read back from a package (coremltools' ``Program``: ``Var`` and
    ``Operation`` objects pointing at each other, holding the weights) is collected as soon as the
    interpreter has prepared its plan, not whenever Python's collector gets to the cycles: with
    automatic collection off, nothing read stays alive after the load."""
    import gc
    import weakref

    from anefx.targets.mil import program as mil_program

    read = []

    def recording(original):
        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            read.append(weakref.ref(out.program))
            return out

        return wrapped

    for name in ("read_package", "read_mlmodel"):
        monkeypatch.setattr(mil_program, name, recording(getattr(mil_program, name)))
    monkeypatch.setattr(mil_program, "COLLECT_ABOVE_BYTES", 0)  # as for a chunk of a large model
    _, lm = whisper_two_decoder_chunks
    gc.disable()
    try:
        executor = lm.artifact.target.executor(lm.artifact.chunks[-1].package)
        assert len(read) == 1 and read[0]() is None and "decode" in executor.functions
    finally:
        gc.enable()
