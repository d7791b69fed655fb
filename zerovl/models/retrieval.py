"""BLIP-2 image-text matching (stage 1) on top of transformers' ``Blip2ForImageTextRetrieval``.

The HF class holds the parts — vision tower, Q-Former with its text embeddings, ITC projections, ITM
head — and scores one batch of pairs; training needs more, so this module adds what LAVIS's
``Blip2Qformer`` has and HF lacks: the learned temperature, the three objectives and negatives from
every rank.

* **ITC**: queries see the image, the text's [CLS] sees the text; their similarity is the maximum over
  query tokens. Features of all ranks are gathered with gradient (``all_gather_single_autograd``), each
  rank scores its own rows against the global batch and DeepSpeed averages the gradients, so the loss
  and gradients equal those of one process on the whole global batch. Rows of the same image (COCO's
  five captions) are all positives: the target is spread over them, never a negative.
* **ITM**: for every pair, a hard negative text and a hard negative image are drawn from the ITC
  softmax over the global batch (other images only); queries and text run jointly through the Q-Former,
  cross-attending to the image, and a 2-way head on the mean query output says match / no match.
* **ITG** (optional): the text is generated from the queries through the Q-Former with a causal mask
  (queries see queries, text sees queries and earlier text), a linear head over the vocabulary.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

TEMPERATURE_RANGE = (0.001, 0.5)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated on dim 0; gradients flow back to the rank that owns each row."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def rank_offset(rows: int) -> int:
    import torch.distributed as dist

    return dist.get_rank() * rows if dist.is_initialized() else 0


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 similarities and losses are taken in fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.element_size() < 4 else x


def soft_targets(local_ids: torch.Tensor, global_ids: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Target distribution over the global batch: uniform over every column showing the same image,
    then label smoothing (as ``F.cross_entropy(label_smoothing=)`` spreads it)."""
    positive = (local_ids[:, None] == global_ids[None, :]).float()
    targets = positive / positive.sum(1, keepdim=True)
    return targets * (1 - smoothing) + smoothing / global_ids.numel()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(at_least_fp32(logits), dim=1) * targets).sum(1).mean()


def itg_attention_mask(text_mask: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, Q+T, Q+T] mask: queries attend to queries; text attends to every query and to
    earlier (non-padding) text — UniLM's seq2seq mask, as BLIP-2 uses for generation."""
    b, t = text_mask.shape
    n = queries + t
    allowed = torch.zeros(b, n, n, dtype=torch.bool, device=text_mask.device)
    allowed[:, :, :queries] = True
    causal = torch.ones(t, t, dtype=torch.bool, device=text_mask.device).tril()
    allowed[:, queries:, queries:] = causal[None] & text_mask.bool()[:, None, :]
    return torch.zeros(b, 1, n, n, dtype=dtype, device=text_mask.device).masked_fill(
        ~allowed[:, None], torch.finfo(dtype).min)


class RetrievalModel(nn.Module):
    """Training and scoring for image-text retrieval; ``hf`` is the transformers model (what loads and exports)."""

    kind = "retrieval"

    def __init__(self, hf: nn.Module, temperature: float = 0.07, itc_weight: float = 1.0, itm_weight: float = 1.0,
                 itg_weight: float = 0.0, label_smoothing: float = 0.1, bos_token_id: int | None = None):
        super().__init__()
        self.hf = hf
        self.temp = nn.Parameter(torch.full((1,), float(temperature)))  # 1-d: DeepSpeed cannot broadcast 0-d
        self.weights = {"itc": itc_weight, "itm": itm_weight, "itg": itg_weight}
        self.label_smoothing = label_smoothing
        qcfg = hf.config.qformer_config
        self.itg_head = nn.Linear(qcfg.hidden_size, qcfg.vocab_size) if itg_weight > 0 else None
        self.bos_token_id = bos_token_id
        self.loss_parts: dict[str, torch.Tensor] = {}
        if hasattr(hf.query_tokens, "ds_id"):
            # ZeRO-3 gathers a module's parameters when *its* forward runs; hf.forward never does here,
            # so the query tokens it owns are fetched with this module's forward instead
            import deepspeed

            deepspeed.zero.register_external_parameter(self, hf.query_tokens)

    # ---- parts ----------------------------------------------------------------------------------

    @property
    def num_queries(self) -> int:
        return self.hf.config.num_query_tokens

    @property
    def tokens_per_image(self) -> int:
        return self.num_queries

    def vision_token_count(self, batch: dict[str, torch.Tensor]) -> int:
        vcfg = self.hf.config.vision_config
        patches = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        return int(batch["pixel_values"].shape[0]) * patches

    def queries(self, n: int) -> torch.Tensor:
        return self.hf.query_tokens.expand(n, -1, -1)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.hf.vision_model
        dtype = next(vision.parameters()).dtype
        return vision(pixel_values=pixel_values.to(dtype)).last_hidden_state

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[N, Q, D] L2-normalized query features (the image side of ITC)."""
        out = self.hf.qformer(query_embeds=self.queries(image_embeds.shape[0]).to(image_embeds.dtype),
                              encoder_hidden_states=image_embeds).last_hidden_state
        return F.normalize(self.hf.vision_projection(out), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, D] L2-normalized [CLS] features (the text side of ITC)."""
        out = self.hf.qformer(query_embeds=self.hf.embeddings(input_ids=input_ids), query_length=0,
                              attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.hf.text_projection(out[:, 0, :]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, 2] no-match / match logits for aligned rows of images and texts."""
        n = input_ids.shape[0]
        queries = self.queries(n)
        embeds = self.hf.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        out = self.hf.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=mask,
                              encoder_hidden_states=image_embeds).last_hidden_state
        return self.hf.itm_head(out[:, :queries.shape[1], :]).mean(dim=1)

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(*TEMPERATURE_RANGE)

    # ---- training ---------------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor, loss_reduction: str = "mean", **_: object) -> torch.Tensor:
        """The weighted sum of the enabled losses (each a mean over this rank's pairs); the parts,
        detached, in ``loss_parts``."""
        image_embeds = self.image_embeds(pixel_values)
        image_feats = self.image_features(image_embeds)  # [B, Q, D]
        text_feat = self.text_features(input_ids, attention_mask)  # [B, D]
        image_feats_all = gather_with_grad(image_feats)
        text_feat_all = gather_with_grad(text_feat)
        ids_all = gather(image_ids)
        temp = self.temperature()
        # similarity = the best-matching query token
        sim_i2t = torch.einsum("iqd,td->itq", at_least_fp32(image_feats), at_least_fp32(text_feat_all)).amax(-1) / temp
        sim_t2i = torch.einsum("td,iqd->tiq", at_least_fp32(text_feat), at_least_fp32(image_feats_all)).amax(-1) / temp
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=pixel_values.device)
        if self.weights["itc"] > 0:
            targets = soft_targets(image_ids, ids_all, self.label_smoothing)
            parts["itc"] = (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2
        if self.weights["itm"] > 0:
            parts["itm"] = self._itm_loss(image_embeds, input_ids, attention_mask, image_ids, ids_all,
                                          sim_i2t.detach(), sim_t2i.detach())
        if self.weights["itg"] > 0:
            parts["itg"] = self._itg_loss(image_embeds, input_ids, attention_mask)
        for name, value in parts.items():
            total = total + self.weights[name] * value
        self.loss_parts = {k: v.detach() for k, v in parts.items()}
        return total

    def _itm_loss(self, image_embeds, input_ids, attention_mask, image_ids, ids_all, sim_i2t, sim_t2i):
        """Positives, plus per pair one negative text and one negative image sampled by ITC similarity."""
        b = input_ids.shape[0]
        embeds_all = gather_with_grad(image_embeds)
        ids_text_all = gather(input_ids)
        mask_text_all = gather(attention_mask)
        same = image_ids[:, None] == ids_all[None, :]
        with torch.no_grad():
            w_t2i = F.softmax(sim_t2i, dim=1).masked_fill(same, 0)
            w_i2t = F.softmax(sim_i2t, dim=1).masked_fill(same, 0)
            lonely = w_t2i.sum(1) == 0  # the whole global batch shows this image: any other row then
            if lonely.any():
                others = torch.ones_like(w_t2i)
                others[torch.arange(b), rank_offset(b) + torch.arange(b)] = 0
                w_t2i[lonely] = others[lonely]
                w_i2t[lonely] = others[lonely]
            neg_image = torch.multinomial(w_t2i + 1e-12 * (w_t2i.sum(1, keepdim=True) == 0), 1).squeeze(1)
            neg_text = torch.multinomial(w_i2t + 1e-12 * (w_i2t.sum(1, keepdim=True) == 0), 1).squeeze(1)
        ids = torch.cat([input_ids, input_ids, ids_text_all[neg_text]])
        mask = torch.cat([attention_mask, attention_mask, mask_text_all[neg_text]])
        images = torch.cat([image_embeds, embeds_all[neg_image], image_embeds])
        logits = self.itm_logits(images, ids, mask)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return F.cross_entropy(at_least_fp32(logits), labels)

    def _itg_loss(self, image_embeds, input_ids, attention_mask):
        queries = self.queries(input_ids.shape[0])
        decoder_ids = input_ids.clone()
        if self.bos_token_id is not None:
            decoder_ids[:, 0] = self.bos_token_id  # BLIP-2 swaps [CLS] for a decoder-start token
        embeds = self.hf.embeddings(input_ids=decoder_ids, query_embeds=queries)
        mask = itg_attention_mask(attention_mask, queries.shape[1], embeds.dtype)
        out = self.hf.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=mask,
                              encoder_hidden_states=image_embeds).last_hidden_state
        logits = self.itg_head(out[:, queries.shape[1]:-1, :])
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(at_least_fp32(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1))


# ---- building -------------------------------------------------------------------------------------


def retrieval_config(settings):
    """The Blip2Config of ``model.retrieval``: its directory's, or the inline one (random init)."""
    from zerovl.errors import ConfigError
    from zerovl.models.pretrained import part_config

    if settings.path is None:  # inline: the Q-Former takes text (its own feed-forward for text tokens)
        inline = dict(settings.config)
        inline["qformer_config"] = {"use_qformer_text_input": True, **(inline.get("qformer_config") or {})}
        settings = settings.model_copy(update={"config": inline})
    config = part_config(settings, "model.retrieval", "blip-2")
    if config.model_type != "blip-2":
        raise ConfigError(f"model.retrieval: model_type '{config.model_type}' is not blip-2 (a "
                          "Blip2ForImageTextRetrieval directory or an inline Blip2Config)")
    if not config.qformer_config.use_qformer_text_input:
        raise ConfigError("model.retrieval: its Q-Former has no text side (qformer_config.use_qformer_text_input "
                          "is false: a captioning checkpoint?); use a Blip2ForImageTextRetrieval directory such as "
                          "Salesforce/blip2-itm-vit-g")
    return config


def build_retrieval(settings, tokenizer, dtype: torch.dtype):
    """(RetrievalModel, image processor) for ``model.retrieval``."""
    from transformers import BlipImageProcessorPil as BlipImageProcessor  # no torchvision here

    from zerovl.errors import ConfigError
    from zerovl.models.vision import ImageProcessor
    from zerovl.models.weights import to_dtype

    r = settings.retrieval
    config = retrieval_config(r)
    from transformers import Blip2ForImageTextRetrieval

    if r.path is not None:
        try:
            hf = Blip2ForImageTextRetrieval.from_pretrained(r.path, dtype=dtype)
        except OSError as e:
            raise ConfigError(f"model.retrieval.path: cannot load {r.path} ({e})") from None
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(r.path, backend="pil")
        except OSError:
            processor = None
    else:
        hf = Blip2ForImageTextRetrieval._from_config(config)  # ZeRO-3 aware (zero.Init, gathered init)
        # transformers starts the queries at zero (its checkpoints overwrite them); from scratch they must
        # differ, as LAVIS draws them: all-zero queries are a constant row that LayerNorm cannot normalise
        init_queries(hf.query_tokens, config.qformer_config.initializer_range)
        hf = to_dtype(hf, dtype)
        processor = None
    if processor is None:
        size = config.vision_config.image_size
        processor = BlipImageProcessor(**{"size": {"height": size, "width": size}, **(r.image_processor or {})})
    vocab = config.qformer_config.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"model.tokenizer: {len(tokenizer)} tokens, but the Q-Former's vocabulary has {vocab}; "
                          "use the tokenizer it was trained with (BERT's for BLIP-2)")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    model = RetrievalModel(hf, r.temperature, r.itc_weight, r.itm_weight, r.itg_weight, r.label_smoothing, bos)
    to_dtype(model, dtype)
    return model, ImageProcessor(processor)


@torch.no_grad()
def init_queries(queries: nn.Parameter, std: float) -> None:
    if hasattr(queries, "ds_id"):  # ZeRO-3: drawn on rank 0, the same on every rank
        import deepspeed

        with deepspeed.zero.GatheredParameters([queries], modifier_rank=0):
            nn.init.trunc_normal_(queries, std=std)
        return
    nn.init.trunc_normal_(queries, std=std)


def retrieval_parts(model: RetrievalModel) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """vision = the tower; connector = everything else (Q-Former, text embeddings, queries, heads, temperature)."""
    vision = [(f"hf.vision_model.{n}", p) for n, p in model.hf.vision_model.named_parameters()]
    taken = {id(p) for _, p in vision}
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in taken]
    return {"vision": vision, "connector": rest}
