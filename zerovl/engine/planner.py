"""Know before you launch: the memory a config needs per GPU and per node under each ZeRO option.

Everything here is arithmetic on parameter counts and layer shapes; no DeepSpeed engine is built and
no weight is read. :func:`count_model` builds the composed model on PyTorch's ``meta`` device (shapes
only, no storage) from the config files alone, so a 7B plan runs on a laptop.

Model states, in bytes per parameter element (``p`` = 2 for bf16/fp16, 4 for fp32; ``N`` = GPUs in
total; ``o`` = optimizer moments, 8 for Adam):

* **ZeRO-0**: every rank holds working params ``p``, working grads ``p``, an fp32 master copy and
  fp32 grads (4 + 4, only when ``p`` is 16-bit) and the moments ``o`` for every trainable element.
* **ZeRO-1**: params and grads as ZeRO-0; fp32 master + fp32 grads + moments (``8 + o``) split ``/N``.
* **ZeRO-2**: as ZeRO-1, and the working grads are split ``/N`` too.
* **ZeRO-3**: params and grads split ``/N`` (frozen params too), plus the largest single module
  gathered whole (its params and grads, ``2p``) while it runs.
* **Offload**: optimizer offload moves the fp32 master, fp32 grads and moments to host RAM (and
  with it the ZeRO-2/3 gradient partitions); param offload (ZeRO-3) moves the params' shards too.
* Frozen parameters (frozen parts, the base weights under LoRA) only cost their working params.

These are the byte counts of DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``)
with one deliberate difference: for ZeRO-3 without offload DeepSpeed's formula counts 18 bytes/N
per parameter, while ``stage3.py`` keeps both a 16-bit parameter shard and a 16-bit gradient shard
(``grad_partitions_flat_buffer``) next to the 16 bytes of fp32 state, so we count 20 bytes/N.

Activations are a first-order count of what autograd keeps for backward, per transformer layer and
per token (h = hidden, q/kv = query/key-value width, I = MLP width, V = vocabulary):

* LLM layer: ``2 x (4h + p·h)`` for the two RMSNorms (their fp32 input and normalized output) plus
  ``p x (2h + 2q + 2kv + 4I)`` for the inputs of the projections, q/k/v and the attention output
  (fused SDPA/flash attention: no s x s matrix) and the gated MLP's four I-wide tensors (two for a
  plain MLP). With gradient checkpointing a layer keeps only its input (``p·h``) and one layer is
  recomputed at a time.
* LLM head: the final norm (``4h + p·h``). The loss runs through the head in chunks of tokens
  (``zerovl/models/loss.py``), with each chunk's gradient computed in the forward: per token it keeps
  an fp32 hidden-row gradient and the row's index (``4h + 8``); per micro-batch, not per sample, one
  chunk's fp32 logits exist at a time (``rows x V x 4``, plus their 16-bit copy for bf16/fp16) and, when
  the head trains, its fp32 weight gradient (``4·V·h``, plus a transient 16-bit product for one
  vocabulary slice) is kept until backward. Every token is assumed supervised (prompt tokens skip the head, so real runs keep
  less). Models outside ``loss.CHUNKED_MODEL_TYPES``, or ``chunk_tokens=0``, take transformers' plain
  path: the head's input (``p·h``), fp32 log-probs (``4·V``) and two more fp32 V-wide gradients at the
  start of backward (``8·V``) per token.
* Vision layer (only when the tower trains): ``p x (8h + 2I)`` per patch token (LayerNorms, q/k/v,
  attention output, GELU MLP), or ``p·h`` with checkpointing; plus the patch embedding's input.
* Connector: its input and each hidden activation per image token.

Retrieval models (``model.retrieval``, BLIP-2 stage 1; :func:`count_retrieval`) have no LLM: ``llm`` is
the Q-Former's stack (H, I, L layers, C = ceil(L / cross_attention_frequency) cross-attention layers),
``seq_len`` the caption length T (``model.retrieval.max_text_length``), Q the query tokens, Nv the vision
tokens ((image_size / patch_size)^2 + 1), Dv the tower's width, Dp the ITC projection width and ``d`` 1
byte per element when the Q-Former's hidden dropout is on (CUDA's bool mask; CPU's dropout keeps its mask
in the input dtype). Per training pair the Q-Former runs these passes (s tokens, c of them cross-attending):

* image (s = c = Q), text (s = T, c = 0), ITM on 3 pairs (s = Q + T, c = Q, each), and ITG when
  ``itg_weight`` > 0 (s = Q + T, c = Q); each pass keeps
  ``s x (p·H + d·H)`` (embedding LayerNorm, dropout) ``+ L x s x (p x (8H + 2I) + 2d·H)`` (the BERT layers:
  the vision layer's count, post-LN) ``+ L x s x p·H`` when queries and text share the pass (each layer
  concatenates its query and text halves) ``+ C x (c x (4p·H + d·H) + Nv x 2p·H)`` (cross-attention: the
  queries' projections and LayerNorm, the image's keys and values) ``+ s x p·H`` (the output its head reads).
* The image features the cross-attention reads: ``p·Nv·Dv`` once, ``3p·Nv·Dv`` more for the ITM batch
  (positive, negative image, positive image again, concatenated); with N > 1 ranks ITM also holds every
  rank's features during its forward (``N x p·Nv·Dv``).
* ITC: the projected, normalised features, ``(Q + 1) x Dp x (2p + 4)`` (16-bit and fp32 copies).
* ITG head (only when ITG is on): per predicted text token (T - 1) its input ``p·H`` and the fp32
  log-probs ``4·V``, plus the two fp32 V-wide gradients at the start of backward (``8·V``) — transformers'
  plain loss path; no LM loss workspace otherwise.
* Vision tower: as above, only when it trains (BLIP-2 stage 1 freezes it; LAVIS's COCO fine-tune does not).

Not counted for retrieval: ITC's similarity matrices (micro batch x global batch x Q fp32, under a MiB
at BLIP-2's sizes) and the ITM sampling weights (no gradient). Q-Former gradient checkpointing is not
wired, so none is modelled.

Not counted: LoRA dropout copies, attention implementations that materialise s x s, CUDA context
and allocator fragmentation — the planner's margin (default 10 %) is there for those. The
``buffers`` row is DeepSpeed's gradient-reduction and prefetch buckets at their default sizes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from zerovl.errors import ConfigError
from zerovl.models.loss import DEFAULT_CHUNK_TOKENS, VOCAB_SLICE

log = logging.getLogger(__name__)

PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# bytes of optimizer state per trainable element (fp32 moments); DeepSpeed config optimizer names
OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "fusedadam": 8, "cpuadam": 8, "lamb": 8, "adagrad": 4,
                         "lion": 4, "muon": 4, "muadam": 8, "muadamw": 8, "musgd": 4}
# DeepSpeed 0.19 defaults (runtime/zero/config.py), used for the buffers row
REDUCE_BUCKET_SIZE = 500_000_000
PREFETCH_BUCKET_SIZE = 50_000_000
# transformers' plain loss path (full logits), per token:
LOSS_SAVED_BYTES_PER_VOCAB = 4  # fp32 log-probs cross-entropy keeps for backward
LOSS_BACKWARD_BYTES_PER_VOCAB = 8  # the two fp32 V-wide gradients alive at the start of backward
# zerovl's chunked loss path (models/loss.py), per supervised token: the fp32 hidden-row gradient is
# 4 bytes x hidden; this is the int64 row index the selection of supervised rows keeps
LOSS_INDEX_BYTES = 8
_UNITS = {"": 2**30, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


@dataclass(frozen=True)
class Option:
    """One way to run: a ZeRO stage with or without CPU offload."""

    name: str
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def deepspeed(self) -> str | dict[str, Any]:
        """The value of the config's ``deepspeed`` key that selects this option."""
        from zerovl.config import PRESET_NAMES

        if self.name in PRESET_NAMES:
            return self.name
        zero: dict[str, Any] = {"stage": self.stage}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if self.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return {"zero_optimization": zero}

    @property
    def override(self) -> str:
        """A ``key=value`` override for the command line (JSON is valid YAML flow style)."""
        value = self.deepspeed
        return f"deepspeed={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"


# Fastest first: the recommendation is the first that fits. Offload costs PCIe traffic and CPU Adam
# time every step, so every offload variant ranks after every GPU-only stage.
OPTIONS: tuple[Option, ...] = (
    Option("zero0", 0),
    Option("zero1", 1),
    Option("zero2", 2),
    Option("zero3", 3),
    Option("zero1_offload", 1, offload_optimizer=True),
    Option("zero2_offload", 2, offload_optimizer=True),
    Option("zero3_offload_opt", 3, offload_optimizer=True),
    Option("zero3_offload", 3, offload_optimizer=True, offload_param=True),
)
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int
    gpu_mem: int
    nodes: int = 1
    cpu_mem: int | None = None  # per node; None = not checked

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class PartParams:
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass(frozen=True)
class Stack:
    """The shape of a transformer stack, as far as activations care."""

    layers: int
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    gated_mlp: bool
    checkpointing: bool


@dataclass(frozen=True)
class RetrievalShape:
    """What a BLIP-2 retrieval model adds to its shape; ``ModelShape.llm`` is then its Q-Former's stack."""

    queries: int  # Q learned query tokens
    cross_layers: int  # Q-Former layers with cross-attention to the image
    encoder_hidden: int  # the width of the vision features the cross-attention reads (Dv)
    projection: int  # ITC feature width (image_text_hidden_size, Dp)
    itm: bool  # ITM on: 3 more Q-Former passes (Q + T tokens) per pair
    itg: bool  # ITG on: one more pass and a vocabulary-wide head per text token
    dropout: bool  # the Q-Former's hidden dropout is on: a 1-byte mask per dropped element

    @property
    def passes(self) -> str:
        """The Q-Former passes per training pair, in words."""
        return ", ".join(["image (Q)", "text (T)", "ITM 3 x (Q+T)" if self.itm else "no ITM",
                          "ITG (Q+T)" if self.itg else "no ITG"])


@dataclass(frozen=True)
class ModelShape:
    """Everything the memory model needs, read from configs on the meta device."""

    parts: dict[str, PartParams]
    largest_layer: int  # elements of the largest single module (what ZeRO-3 gathers at once)
    llm: Stack
    vocab: int
    vision: Stack | None = None
    vision_tokens: int = 0  # tokens the vision tower produces per image
    patch_elements: int = 0  # pixels x channels per patch (the patch embedding's saved input)
    vision_trainable: bool = False
    connector_elements: int = 0  # activation elements the connector keeps per image
    connector_active: bool = False  # the connector keeps activations (it or the tower trains)
    tokens_per_image: int = 0
    head_trainable: bool = True  # the output projection gets a gradient (full LLM, not LoRA/frozen)
    chunked_loss: bool = True  # the loss takes zerovl's chunked path (models/loss.py), not the plain one
    retrieval: RetrievalShape | None = None  # a retrieval model (model.retrieval): llm is its Q-Former
    notes: tuple[str, ...] = ()

    @property
    def trainable(self) -> int:
        return sum(p.trainable for p in self.parts.values())

    @property
    def frozen(self) -> int:
        return sum(p.frozen for p in self.parts.values())

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass
class Estimate:
    """Memory of one option: bytes per GPU and per node (host RAM) by category."""

    option: Option
    gpu: dict[str, int]
    cpu: dict[str, int]
    activation_per_sample: int
    cpu_load: int  # transient host RAM at start-up, while the local ranks build the model
    budget: int  # usable GPU bytes after the margin
    micro_batch: int
    max_micro_batch: int = 0
    fits: bool = False
    activation_fixed: int = 0  # per micro-batch, whatever its size: the chunked loss's workspace

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def static_gpu(self) -> int:
        return self.gpu_total - self.gpu.get("activations", 0)

    @property
    def cpu_total(self) -> int:
        return max(sum(self.cpu.values()), self.cpu_load)


@dataclass
class Plan:
    shape: ModelShape
    hardware: Hardware
    precision: str
    micro_batch: int
    seq_len: int
    images_per_sample: int
    margin: float
    estimates: list[Estimate]
    recommended: Estimate | None
    notes: list[str] = field(default_factory=list)
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS


def parse_size(text: str | int | float) -> int:
    """'80GB' / '80G' / '80GiB' / '512 gb' / 80 -> bytes. GB means GiB, as GPU vendors' '80GB' does."""
    if isinstance(text, int | float):
        return int(text * 2**30)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"cannot read memory size '{text}'; write it like 80GB, 40GiB or 512G")
    return int(float(match.group(1)) * _UNITS[unit])


def optimizer_state_bytes(optimizer_type: str | None) -> int:
    """Bytes of optimizer state per trainable element for a DeepSpeed optimizer type (default Adam)."""
    if optimizer_type is None:
        return 8
    key = optimizer_type.lower()
    if key not in OPTIMIZER_STATE_BYTES:
        log.warning("planner: unknown optimizer %s, assuming Adam's 8 bytes of state per parameter", optimizer_type)
    return OPTIMIZER_STATE_BYTES.get(key, 8)


# ---- model states -----------------------------------------------------------------------------

def model_state_bytes(shape: ModelShape, option: Option, hardware: Hardware, precision: str,
                      state_bytes: int = 8) -> tuple[dict[str, int], dict[str, int]]:
    """(per-GPU, per-node host RAM) bytes of params, grads and optimizer states for one option.

    Keys: ``params_trainable``, ``params_frozen``, ``gathered`` (ZeRO-3's live layer), ``grads``,
    ``fp32_copies`` (master params + fp32 grads), ``moments`` (optimizer state)."""
    p = PRECISION_BYTES[precision]
    n = hardware.total_gpus
    trainable, frozen = shape.trainable, shape.frozen
    # DeepSpeed keeps an fp32 master copy and fp32 grads; ZeRO-0 without mixed precision does not
    fp32_copies = 8 if (option.stage > 0 or p != 4) else 0
    split = n if option.stage >= 1 else 1
    gpu = {"params_trainable": trainable * p, "params_frozen": frozen * p, "gathered": 0,
           "grads": trainable * p, "fp32_copies": fp32_copies * trainable // split,
           "moments": state_bytes * trainable // split}
    cpu = dict.fromkeys(gpu, 0)
    if option.stage >= 2:
        gpu["grads"] = trainable * p // n
    if option.stage >= 3:
        gpu["params_trainable"] = trainable * p // n
        gpu["params_frozen"] = frozen * p // n
        gpu["gathered"] = 2 * p * shape.largest_layer
    moved = ["fp32_copies", "moments"] if option.offload_optimizer else []
    if option.offload_optimizer and option.stage >= 2:
        gpu["grads"] = 0  # reduced straight into the host fp32 gradient partition (in fp32_copies)
    if option.offload_param:
        moved += ["params_trainable", "params_frozen"]
    for key in moved:  # each of this node's ranks keeps its shard in host RAM
        cpu[key], gpu[key] = gpu[key] * hardware.gpus_per_node, 0
    return gpu, {k: v for k, v in cpu.items() if v}


def buffer_bytes(option: Option, precision: str) -> int:
    """DeepSpeed's communication buckets at their default sizes (allocated whatever the model size)."""
    from zerovl.engine.ds_config import PRESETS

    p = PRECISION_BYTES[precision]
    if option.stage == 0:
        return 0
    preset = PRESETS.get(option.name, {}).get("zero_optimization", {})
    if option.stage == 3:  # contiguous reduce bucket + parameter prefetch bucket
        return (REDUCE_BUCKET_SIZE + PREFETCH_BUCKET_SIZE) * p
    # ZeRO-1/2 with contiguous_gradients (DeepSpeed's default): one bucket, two with overlap_comm
    count = 2 if preset.get("overlap_comm", False) else 1
    return count * REDUCE_BUCKET_SIZE * p


# ---- activations ------------------------------------------------------------------------------

def _llm_layer_bytes_per_token(s: Stack, p: int) -> int:
    mlp = (4 if s.gated_mlp else 2) * s.intermediate
    return 2 * (4 * s.hidden + p * s.hidden) + p * (2 * s.hidden + 2 * s.q_dim + 2 * s.kv_dim + mlp)


def _vision_layer_bytes_per_token(s: Stack, p: int) -> int:
    return p * (8 * s.hidden + 2 * s.intermediate)


def _stack_bytes(per_layer: int, s: Stack, p: int, tokens: int) -> int:
    if s.checkpointing:  # each layer keeps its input; one layer is recomputed at a time in backward
        return tokens * (s.layers * p * s.hidden + per_layer)
    return tokens * s.layers * per_layer


def _chunked(shape: ModelShape, chunk_tokens: int) -> bool:
    return shape.chunked_loss and chunk_tokens > 0


def _vision_bytes(shape: ModelShape, p: int, images: int) -> int:
    if shape.vision is None or not shape.vision_trainable:
        return 0
    tokens = images * shape.vision_tokens
    per_layer = _vision_layer_bytes_per_token(shape.vision, p)
    return (_stack_bytes(per_layer, shape.vision, p, tokens)
            + tokens * p * (shape.patch_elements + 2 * shape.vision.hidden))


def _qformer_pass_bytes(shape: ModelShape, p: int, tokens: int, cross: int) -> int:
    """One Q-Former pass over ``tokens`` tokens, ``cross`` of them (the queries) cross-attending to the
    image's ``vision_tokens`` features (the module docstring's formula)."""
    r, q = shape.retrieval, shape.llm
    h, d = q.hidden, int(r.dropout)
    mixed = 0 < cross < tokens  # queries and text in one pass: each layer concatenates the two halves
    out = tokens * (p * h + d * h)  # the embeddings' LayerNorm input and dropout mask
    out += q.layers * tokens * (_vision_layer_bytes_per_token(q, p) + 2 * d * h + (p * h if mixed else 0))
    if cross:
        out += r.cross_layers * (cross * (4 * p * h + d * h) + shape.vision_tokens * 2 * p * h)
    return out + tokens * p * h  # the last layer's output, which the pass's head reads


def _retrieval_breakdown(shape: ModelShape, text_len: int, p: int, world: int) -> dict[str, int]:
    r = shape.retrieval
    queries = r.queries
    features = shape.vision_tokens * r.encoder_hidden * p  # one image's vision features
    out = {
        "vision": _vision_bytes(shape, p, 1),
        "image_features": features * (1 + (3 if r.itm else 0) + (world if r.itm and world > 1 else 0)),
        "qformer_image": _qformer_pass_bytes(shape, p, queries, queries),
        "qformer_text": _qformer_pass_bytes(shape, p, text_len, 0),
        "qformer_itm": 3 * _qformer_pass_bytes(shape, p, queries + text_len, queries) if r.itm else 0,
        "qformer_itg": _qformer_pass_bytes(shape, p, queries + text_len, queries) if r.itg else 0,
        "itc": (queries + 1) * r.projection * (2 * p + 4),
        "itg_head": 0,
        "loss_backward": 0,
    }
    if r.itg:  # the text positions after the first predict the next token over the whole vocabulary
        predicted = text_len - 1
        out["itg_head"] = predicted * (p * shape.llm.hidden + LOSS_SAVED_BYTES_PER_VOCAB * shape.vocab)
        out["loss_backward"] = predicted * LOSS_BACKWARD_BYTES_PER_VOCAB * shape.vocab
    return out


def activation_breakdown(shape: ModelShape, seq_len: int, precision: str, images_per_sample: int = 1,
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS, world: int = 1) -> dict[str, int]:
    """Activation bytes for ONE sample (micro batch of 1), by where they are kept; the chunked loss's
    per-micro-batch workspace is :func:`loss_workspace`. For a retrieval model a sample is one
    image-caption pair, ``seq_len`` the caption length and ``world`` the ranks whose image features ITM
    gathers."""
    p = PRECISION_BYTES[precision]
    if shape.retrieval is not None:
        return _retrieval_breakdown(shape, seq_len, p, world)
    llm = shape.llm
    out = {
        "llm_layers": _stack_bytes(_llm_layer_bytes_per_token(llm, p), llm, p, seq_len),
        "llm_head": seq_len * (4 * llm.hidden + p * llm.hidden),
        "loss": seq_len * (4 * llm.hidden + LOSS_INDEX_BYTES),
        "loss_backward": 0,
        "vision": 0,
        "connector": 0,
    }
    if not _chunked(shape, chunk_tokens):  # transformers' plain path: full logits, their input kept
        out["llm_head"] += seq_len * p * llm.hidden
        out["loss"] = seq_len * LOSS_SAVED_BYTES_PER_VOCAB * shape.vocab
        out["loss_backward"] = seq_len * LOSS_BACKWARD_BYTES_PER_VOCAB * shape.vocab
    out["vision"] = _vision_bytes(shape, p, images_per_sample)
    if shape.connector_active:
        out["connector"] = images_per_sample * shape.connector_elements * p
    return out


def loss_workspace(shape: ModelShape, tokens: int, precision: str,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict[str, int]:
    """Bytes the chunked loss needs once per micro-batch of ``tokens`` supervised tokens, whatever the
    number of samples: ``loss_chunk`` (one chunk's fp32 logits and, in 16-bit, their 16-bit copy; only
    during the head's forward), ``head_grad`` (the head's fp32 weight gradient, kept until backward)
    and ``head_grad_chunk`` (a 16-bit weight-gradient product for one vocabulary slice, transient).
    Zeros on the plain path."""
    if not _chunked(shape, chunk_tokens):
        return {"loss_chunk": 0, "head_grad": 0, "head_grad_chunk": 0}
    p = PRECISION_BYTES[precision]
    half = p if p != 4 else 0  # a 16-bit copy next to the fp32 tensor
    rows = min(chunk_tokens, tokens)
    trainable = shape.head_trainable
    return {"loss_chunk": rows * shape.vocab * (4 + half),
            "head_grad": 4 * shape.vocab * shape.llm.hidden if trainable else 0,
            "head_grad_chunk": half * min(VOCAB_SLICE, shape.vocab) * shape.llm.hidden if trainable else 0}


# ---- the plan ---------------------------------------------------------------------------------

def estimate(shape: ModelShape, option: Option, hardware: Hardware, precision: str, micro_batch: int,
             seq_len: int, images_per_sample: int = 1, state_bytes: int = 8, margin: float = 0.1,
             chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Estimate:
    """Memory of one option at the given micro batch, whether it fits, and the largest micro batch that does."""
    gpu, cpu = model_state_bytes(shape, option, hardware, precision, state_bytes)
    gpu["buffers"] = buffer_bytes(option, precision)
    per_sample = sum(activation_breakdown(shape, seq_len, precision, images_per_sample, chunk_tokens,
                                          hardware.total_gpus).values())
    fixed = sum(loss_workspace(shape, micro_batch * seq_len, precision, chunk_tokens).values())
    gpu["activations"] = per_sample * micro_batch + fixed
    p = PRECISION_BYTES[precision]
    # start-up host RAM: every local rank builds the whole model before DeepSpeed partitions it, except
    # under ZeRO-3, which builds inside deepspeed.zero.Init and partitions module by module
    built = shape.largest_layer if option.stage == 3 else shape.total
    est = Estimate(option, gpu, cpu, per_sample, cpu_load=hardware.gpus_per_node * built * p,
                   budget=int(hardware.gpu_mem * (1 - margin)), micro_batch=micro_batch, activation_fixed=fixed)
    cpu_ok = hardware.cpu_mem is None or est.cpu_total <= hardware.cpu_mem * (1 - margin)
    # the workspace at its largest (a full chunk), so every micro batch up to the maximum fits
    room = est.budget - est.static_gpu - sum(loss_workspace(shape, chunk_tokens, precision, chunk_tokens).values())
    est.max_micro_batch = max(0, room // per_sample) if cpu_ok and room > 0 else 0
    est.fits = cpu_ok and est.gpu_total <= est.budget
    return est


def plan(shape: ModelShape, hardware: Hardware, precision: str, micro_batch: int, seq_len: int,
         images_per_sample: int = 1, state_bytes: int = 8, margin: float = 0.1,
         options: tuple[Option, ...] = OPTIONS, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Plan:
    """Estimate every option; recommend the first (fastest) that fits the configured micro batch,
    or failing that, the first that fits any micro batch."""
    if not 0 <= margin < 1:
        raise ConfigError(f"--margin must be in [0, 1), got {margin}")
    if hardware.gpus_per_node < 1 or hardware.nodes < 1:
        raise ConfigError("--gpus and --nodes must be at least 1")
    estimates = [estimate(shape, o, hardware, precision, micro_batch, seq_len, images_per_sample,
                          state_bytes, margin, chunk_tokens) for o in options]
    recommended = next((e for e in estimates if e.fits), None)
    if recommended is None:
        recommended = next((e for e in estimates if e.max_micro_batch >= 1), None)
    return Plan(shape, hardware, precision, micro_batch, seq_len, images_per_sample, margin, estimates,
                recommended, list(shape.notes), chunk_tokens)


# ---- counting parameters from configs alone --------------------------------------------------

def _first(cfg: Any, *names: str) -> Any:
    """The first of ``names`` the config sets (0 counts: an embeddings-only tower has 0 layers)."""
    return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)


def _stack_from_config(cfg: Any, checkpointing: bool, gated: bool) -> Stack:
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    if hidden is None or layers is None:
        raise ConfigError(f"planner: cannot read hidden size and layer count from the {cfg.model_type} config")
    heads = _first(cfg, "num_attention_heads", "n_head") or 1
    kv_heads = _first(cfg, "num_key_value_heads") or heads
    head_dim = _first(cfg, "head_dim") or hidden // heads
    intermediate = _first(cfg, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    return Stack(layers=int(layers), hidden=int(hidden), intermediate=int(intermediate),
                 q_dim=int(heads * head_dim), kv_dim=int(kv_heads * head_dim), gated_mlp=gated,
                 checkpointing=checkpointing)


def _count_parts(parts: dict[str, Any]) -> dict[str, PartParams]:
    return _count_params({name: module.parameters() for name, module in parts.items()})


def _count_params(parts: dict[str, Any]) -> dict[str, PartParams]:
    """Trainable / frozen elements of each part's parameters (an iterable of them per part)."""
    seen: set[int] = set()  # tied weights (embeddings / lm_head) are one Parameter: count once
    counts = {}
    for name, params in parts.items():
        trainable = frozen = 0
        for param in params:
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.requires_grad:
                trainable += param.numel()
            else:
                frozen += param.numel()
        counts[name] = PartParams(trainable, frozen)
    return counts


def largest_layer_params(module: Any) -> int:
    """Elements of the largest single module's own parameters, as DeepSpeed's ``model_to_params``."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


def _meta_llm(settings: Any) -> Any:
    from transformers import AutoModelForCausalLM

    from zerovl.models.pretrained import part_config

    trust = settings.path is not None and settings.trust_remote_code
    return AutoModelForCausalLM.from_config(part_config(settings, "model.llm"), trust_remote_code=trust)


def _connector_elements(settings: Any, connector: Any, vision_dim: int, vision_tokens: int, llm_dim: int) -> int:
    """Activation elements one image leaves in the connector for backward."""
    if settings.type == "linear":
        return vision_tokens * vision_dim
    if settings.type == "mlp":
        return vision_tokens * (vision_dim + 2 * (settings.mlp_depth - 1) * llm_dim)
    qcfg = connector.qformer.config  # queries through self-attention layers, cross-attending to the image
    queries = settings.num_query_tokens
    cross_layers = math.ceil(qcfg.num_hidden_layers / max(1, qcfg.cross_attention_frequency))
    per_layer = queries * (8 * qcfg.hidden_size + 2 * qcfg.intermediate_size)
    return (qcfg.num_hidden_layers * per_layer + cross_layers * 2 * vision_tokens * qcfg.hidden_size
            + vision_tokens * vision_dim + queries * qcfg.hidden_size)


def count_model(settings: Any) -> ModelShape:
    """Parameter counts (trainable / frozen per part) and layer shapes of the model a config
    describes, from its config files only: modules are built on the meta device, then the builder's
    own freezing/LoRA rules are applied, so the split matches what training will see."""
    import torch

    from zerovl.models.builder import apply_training_modes, load_tokenizer
    from zerovl.models.connectors import build_connector
    from zerovl.models.loss import base_model, decoder_and_head
    from zerovl.models.vision import VisionTower, tower_classes, vision_config_from
    from zerovl.models.vlm import ComposedVLM

    if settings.retrieval is not None:
        return count_retrieval(settings)
    if settings.native is not None:
        raise ConfigError("zerovl plan models composed VLMs, text-only LLMs and retrieval models; native models "
                          "(model.native) are not modelled yet — use zerovl bench to measure them")
    notes = []
    try:
        tokenizer = load_tokenizer(settings)
    except ConfigError as e:  # a plan does not need the tokenizer, only its size
        tokenizer = None
        notes.append(f"tokenizer not loaded ({e}); vocabulary size taken from the LLM config")
    with torch.device("meta"):
        llm = _meta_llm(settings.llm)
        if tokenizer is not None and len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        gated = any(name.endswith(("gate_proj", "w1", "gate_up_proj")) for name, _ in llm.named_modules())
        llm_stack = _stack_from_config(llm.config, settings.llm.gradient_checkpointing, gated)
        vocab = llm.get_input_embeddings().num_embeddings
        vision = connector = None
        vision_kwargs: dict[str, Any] = {}
        if settings.vision is not None:
            vs = settings.vision
            vcfg = vision_config_from(vs.path, vs.config)
            encoder = tower_classes(vcfg.model_type)[0](vcfg)
            drop_cls = vs.drop_cls  # same rule as models.vision.build_vision
            if drop_cls == "auto":
                drop_cls = settings.connector.type != "qformer" and vcfg.model_type != "siglip_vision_model"
            vision = VisionTower(encoder, vs.feature_layer, drop_cls)
            connector = build_connector(settings.connector, vision.hidden_size, llm_stack.hidden, vision.num_tokens)
            vision_kwargs = dict(  # the tower's own config: VisionTower drops layers after feature_layer
                vision=_stack_from_config(vision.encoder.config, vs.gradient_checkpointing, gated=False),
                vision_tokens=vision.num_tokens,
                patch_elements=getattr(vcfg, "num_channels", 3) * vcfg.patch_size**2,
                vision_trainable=vs.mode != "frozen",
                connector_elements=_connector_elements(settings.connector, connector, vision.hidden_size,
                                                       vision.num_tokens, llm_stack.hidden),
                connector_active=vs.mode != "frozen" or settings.connector.mode != "frozen",
                tokens_per_image=connector.tokens_per_image,
            )
        image_id = tokenizer.convert_tokens_to_ids(settings.image_token) if tokenizer is not None else 0
        model = ComposedVLM(llm, image_id, vision, connector, vision_kwargs.get("vision_trainable", False))
        apply_training_modes(model, settings)
    parts = {"vision": model.vision, "connector": model.connector, "llm": model.llm}
    counts = _count_parts({k: v for k, v in parts.items() if v is not None})
    head = base_model(model.llm).get_output_embeddings()
    return ModelShape(parts=counts, largest_layer=largest_layer_params(model), llm=llm_stack, vocab=vocab,
                      head_trainable=head is not None and any(p.requires_grad for p in head.parameters()),
                      chunked_loss=decoder_and_head(model.llm) is not None, notes=tuple(notes), **vision_kwargs)


def count_retrieval(settings: Any) -> ModelShape:
    """The shape of a ``model.retrieval`` model (BLIP-2's ``Blip2ForImageTextRetrieval`` inside
    :class:`~zerovl.models.retrieval.RetrievalModel`) from its config alone: built on the meta device, the
    builder's retrieval modes applied (vision frozen unless model.vision says otherwise), parameters
    counted per part as training groups them (vision = the tower; connector = everything else)."""
    import torch
    from transformers import Blip2ForImageTextRetrieval

    from zerovl.models.builder import apply_retrieval_training_modes, load_tokenizer
    from zerovl.models.retrieval import RetrievalModel, retrieval_config, retrieval_parts

    r = settings.retrieval
    config = retrieval_config(r)
    vcfg, qcfg = config.vision_config, config.qformer_config
    notes = []
    try:  # only to stop on what training would refuse: the parameter counts do not depend on it
        tokenizer = load_tokenizer(settings)
    except ConfigError as e:
        notes.append(f"tokenizer not loaded ({e}); not checked against the Q-Former's vocabulary")
    else:
        if len(tokenizer) > qcfg.vocab_size:
            raise ConfigError(f"model.tokenizer: {len(tokenizer)} tokens, but the Q-Former's vocabulary has "
                              f"{qcfg.vocab_size}; use the tokenizer it was trained with (BERT's for BLIP-2)")
    with torch.device("meta"):
        model = RetrievalModel(Blip2ForImageTextRetrieval(config), r.temperature, r.itc_weight, r.itm_weight,
                               r.itg_weight, r.label_smoothing)
        apply_retrieval_training_modes(model, settings)
    counts = _count_params({part: (p for _, p in named) for part, named in retrieval_parts(model).items()})
    vision = settings.vision
    shape = RetrievalShape(
        queries=config.num_query_tokens,
        cross_layers=math.ceil(qcfg.num_hidden_layers / max(1, qcfg.cross_attention_frequency)),
        encoder_hidden=vcfg.hidden_size, projection=config.image_text_hidden_size,
        itm=r.itm_weight > 0, itg=r.itg_weight > 0, dropout=(qcfg.hidden_dropout_prob or 0) > 0)
    if (qcfg.attention_probs_dropout_prob or 0) > 0:
        notes.append("the Q-Former's attention dropout is on: fused GPU attention keeps no mask for it, but "
                     "attention that materialises the scores (eager; SDPA on CPU) keeps heads x s x s more per layer")
    itg_head = model.itg_head
    return ModelShape(
        parts=counts, largest_layer=largest_layer_params(model),
        llm=_stack_from_config(qcfg, checkpointing=False, gated=False), vocab=qcfg.vocab_size,
        vision=_stack_from_config(vcfg, vision is not None and vision.gradient_checkpointing, gated=False),
        vision_tokens=(vcfg.image_size // vcfg.patch_size) ** 2 + 1,
        patch_elements=getattr(vcfg, "num_channels", 3) * vcfg.patch_size**2,
        vision_trainable=vision is not None and vision.mode != "frozen", tokens_per_image=config.num_query_tokens,
        head_trainable=itg_head is not None and any(p.requires_grad for p in itg_head.parameters()),
        chunked_loss=False, retrieval=shape, notes=tuple(notes))
