"""The memory planner: parameter counts from configs alone (meta device), model-state bytes against
DeepSpeed's own estimators, activations against what autograd really keeps, and the recommendation."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_LLM, TINY_VISION, tiny_config, write_config
from zerovl.config import from_dict
from zerovl.engine import planner
from zerovl.engine.planner import OPTIONS_BY_NAME, Hardware, parse_size
from zerovl.errors import ConfigError
from zerovl.models.builder import build_model, named_parts

# Qwen2-7B's published config.json (the shapes are all the planner reads)
QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
            "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "torch_dtype": "bfloat16"}
SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                 "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14}


def _settings(scenes, tmp_path, **model):
    cfg = tiny_config(scenes, tmp_path)
    for part, values in model.items():
        cfg["model"][part] = {**cfg["model"].get(part, {}), **values}
    return from_dict(cfg).model


def _real_counts(settings) -> dict[str, tuple[int, int]]:
    built = build_model(settings, "fp32")
    counts = {}
    for name, named in named_parts(built.model).items():
        params = [p for _, p in named]
        counts[name] = (sum(p.numel() for p in params if p.requires_grad),
                        sum(p.numel() for p in params if not p.requires_grad))
    return counts


@pytest.fixture(scope="module")
def qwen2_7b_dir(tmp_path_factory, scenes) -> Path:
    """A 7B model directory that holds only config.json and a tiny tokenizer — no weights."""
    path = tmp_path_factory.mktemp("qwen2_7b")
    (path / "config.json").write_text(json.dumps(QWEN2_7B))
    for f in Path(scenes["tokenizer"]).iterdir():
        shutil.copy(f, path / f.name)
    return path


def _ds_estimators():
    from zerovl.engine.distributed import configure_accelerator

    configure_accelerator()  # DeepSpeed picks its accelerator at import
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs, model_to_params

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs, model_to_params


def _states(shape, option, gpus, nodes=1):
    gpu, cpu = planner.model_state_bytes(shape, OPTIONS_BY_NAME[option], Hardware(gpus, 80 * 2**30, nodes),
                                         "bf16")
    return gpu, sum(gpu.values()), sum(cpu.values())


# ---- counting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("modes", [
    {"vision": "full", "connector": "full", "llm": "full"},
    {"vision": "frozen", "connector": "full", "llm": "lora"},
    {"vision": "lora", "connector": "frozen", "llm": "frozen"},
])
def test_meta_counts_match_the_built_model(scenes, tmp_path, modes):
    settings = _settings(scenes, tmp_path, **{part: {"mode": mode} for part, mode in modes.items()})
    shape = planner.count_model(settings)
    real = _real_counts(settings)
    assert {k: (v.trainable, v.frozen) for k, v in shape.parts.items()} == real
    if modes["llm"] == "lora":  # adapters train, the base does not
        assert 0 < shape.parts["llm"].trainable < shape.parts["llm"].frozen
    _, _, model_to_params = _ds_estimators()
    built = build_model(settings, "fp32").model
    assert shape.total == model_to_params(built)  # DeepSpeed counts a tied embedding once, as we do
    assert shape.largest_layer == planner.largest_layer_params(built)


def test_qformer_connector_and_gradient_checkpointing_on_meta(scenes, tmp_path):
    vision = {**TINY_VISION, "model_type": "clip_vision_model"}
    settings = _settings(scenes, tmp_path, vision={"config": vision},
                         connector={"type": "qformer", "num_query_tokens": 4,
                                    "qformer": {"hidden_size": 32, "num_hidden_layers": 1,
                                                "num_attention_heads": 2, "intermediate_size": 64}},
                         llm={"gradient_checkpointing": True})
    shape = planner.count_model(settings)
    assert {k: (v.trainable, v.frozen) for k, v in shape.parts.items()} == _real_counts(settings)
    assert shape.tokens_per_image == 4 and shape.llm.checkpointing and shape.connector_elements > 0


# ---- model states against DeepSpeed's estimators ----------------------------------------------

@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_model_states_agree_with_deepspeed_estimators(scenes, tmp_path, qwen2_7b_dir, gpus):
    """Like with like: a fully trainable model (DeepSpeed counts every parameter as trainable),
    bf16 + Adam, additional_buffer_factor=1 (its host-RAM safety factor, not a byte count)."""
    zero2, zero3, _ = _ds_estimators()
    settings = _settings(scenes, tmp_path, llm={"path": str(qwen2_7b_dir), "config": None, "mode": "full"},
                         vision={"config": SIGLIP_SO400M, "mode": "full"})
    shape = planner.count_model(settings)
    total, largest = shape.total, shape.largest_layer
    assert shape.frozen == 0 and total > 7.5e9
    errors = {}

    def close(name, ours, theirs):
        errors[name] = abs(ours - theirs) / theirs
        assert errors[name] < 0.05, f"{name}: planner {ours} vs DeepSpeed {theirs}"

    _, gpu, _ = _states(shape, "zero2", gpus)
    close("zero2 gpu", gpu, zero2(total, gpus, 1, cpu_offload=False, additional_buffer_factor=1)[1])
    _, gpu, cpu = _states(shape, "zero2_offload", gpus)
    ds_cpu, ds_gpu = zero2(total, gpus, 1, cpu_offload=True, additional_buffer_factor=1)
    close("zero2_offload gpu", gpu, ds_gpu)
    if gpus <= 4:  # beyond 4 GPUs DeepSpeed's host figure is the per-rank fp32 load (4 B x N), not offload
        close("zero2_offload cpu", cpu, ds_cpu)
    _, gpu, cpu = _states(shape, "zero3_offload_opt", gpus)
    ds_cpu, ds_gpu, _ = zero3(total, largest, gpus, 1, cpu_offload=True, cpu_offload_params=False,
                              zero_init=True, additional_buffer_factor=1)
    close("zero3_offload_opt gpu", gpu, ds_gpu)
    close("zero3_offload_opt cpu", cpu, ds_cpu)
    _, gpu, cpu = _states(shape, "zero3_offload", gpus)
    ds_cpu, ds_gpu, _ = zero3(total, largest, gpus, 1, cpu_offload=True, cpu_offload_params=True,
                              zero_init=True, additional_buffer_factor=1)
    close("zero3_offload gpu", gpu, ds_gpu)
    close("zero3_offload cpu", cpu, ds_cpu)
    # ZeRO-3 without offload: DeepSpeed's formula has 18 B/N per parameter; stage3.py also keeps the
    # 16-bit gradient shard (grad_partitions_flat_buffer), which we count: compare without it, and
    # check that it is the only difference.
    parts, gpu, _ = _states(shape, "zero3", gpus)
    ds_gpu = zero3(total, largest, gpus, 1, cpu_offload=False, cpu_offload_params=False, zero_init=True,
                   additional_buffer_factor=1)[1]
    close("zero3 gpu (without the 16-bit grad shard)", gpu - parts["grads"], ds_gpu)
    assert parts["grads"] == pytest.approx(2 * total / gpus, rel=1e-6)
    print({k: f"{v:.4%}" for k, v in errors.items()})


def test_frozen_and_lora_parts_cost_only_their_working_copy(scenes, tmp_path):
    settings = _settings(scenes, tmp_path, vision={"mode": "frozen"}, llm={"mode": "lora"})
    shape = planner.count_model(settings)
    assert shape.parts["vision"].trainable == 0 and shape.parts["connector"].frozen == 0
    trainable, frozen = shape.trainable, shape.frozen
    assert frozen > trainable > 0
    for precision, p in (("bf16", 2), ("fp32", 4)):
        gpu, cpu = planner.model_state_bytes(shape, OPTIONS_BY_NAME["zero2"], Hardware(4, 2**30), precision)
        assert gpu["params_frozen"] == frozen * p and gpu["params_trainable"] == trainable * p
        assert gpu["grads"] == trainable * p // 4
        assert gpu["fp32_copies"] == 8 * trainable // 4 and gpu["moments"] == 8 * trainable // 4
        assert cpu == {}
    # ZeRO-0 in fp32 keeps no extra fp32 copies; in bf16 it does
    assert planner.model_state_bytes(shape, OPTIONS_BY_NAME["zero0"], Hardware(4, 1), "fp32")[0]["fp32_copies"] == 0
    assert planner.model_state_bytes(shape, OPTIONS_BY_NAME["zero0"], Hardware(4, 1), "bf16")[0]["fp32_copies"] \
        == 8 * trainable
    # ZeRO-3 partitions frozen parameters too
    gpu3, _ = planner.model_state_bytes(shape, OPTIONS_BY_NAME["zero3"], Hardware(4, 1), "bf16")
    assert gpu3["params_frozen"] == frozen * 2 // 4


def test_offload_moves_optimizer_states_to_host_ram(scenes, tmp_path):
    shape = planner.count_model(_settings(scenes, tmp_path))
    hw = Hardware(gpus_per_node=4, gpu_mem=2**30, nodes=2)
    t = shape.trainable
    gpu, cpu = planner.model_state_bytes(shape, OPTIONS_BY_NAME["zero2"], hw, "bf16")
    gpu_off, cpu_off = planner.model_state_bytes(shape, OPTIONS_BY_NAME["zero2_offload"], hw, "bf16")
    assert gpu_off["fp32_copies"] == gpu_off["moments"] == gpu_off["grads"] == 0
    assert gpu_off["params_trainable"] == gpu["params_trainable"]
    # the node's 4 ranks each keep 1/8 of the fp32 master + grads and moments: 16 B x T / 2 nodes
    assert sum(cpu_off.values()) == pytest.approx(16 * t / 2, rel=1e-3) and cpu == {}
    gpu_p, cpu_p = planner.model_state_bytes(shape, OPTIONS_BY_NAME["zero3_offload"], hw, "bf16")
    assert gpu_p["params_trainable"] == 0 and gpu_p["gathered"] == 4 * shape.largest_layer
    assert cpu_p["params_trainable"] == pytest.approx(2 * t / 2, rel=1e-3)


# ---- activations against autograd -------------------------------------------------------------

@pytest.mark.parametrize("precision,checkpointing,chunk", [("fp32", False, 64), ("bf16", False, 64),
                                                            ("bf16", True, 64), ("fp32", False, 0),
                                                            ("bf16", False, 0)])
def test_activation_estimate_matches_what_autograd_saves(scenes, tmp_path, precision, checkpointing, chunk):
    """Sum the bytes of every tensor autograd saves for backward in one training forward of the
    composed model and compare with the first-order estimate — for zerovl's chunked loss (chunks of 64
    tokens) and for transformers' plain path (chunk 0) — without what exists only transiently (one
    chunk's logits, the plain loss's backward buffers, a recomputed layer)."""
    llm = {**TINY_LLM, "hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 512, "tie_word_embeddings": False}
    vision = {**TINY_VISION, "image_size": 64, "hidden_size": 64, "intermediate_size": 256,
              "num_hidden_layers": 2}
    settings = _settings(scenes, tmp_path, vision={"config": vision},
                         llm={"config": llm, "gradient_checkpointing": checkpointing},
                         connector={"type": "mlp"})
    shape = planner.count_model(settings)
    assert shape.chunked_loss and shape.head_trainable
    built = build_model(settings, precision)
    model = built.model.train()
    model.loss_chunk_tokens = chunk
    batch, seq = 2, 96
    ids = torch.randint(0, 60, (batch, seq))
    ids[ids == model.image_token_id] = 0
    ids[:, 2:2 + built.tokens_per_image] = model.image_token_id
    pixels = torch.randn(batch, 3, 64, 64)
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params and t.device.type == "cpu":
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, pixel_values=pixels)
    estimate = planner.activation_breakdown(shape, seq, precision, chunk_tokens=chunk)
    if checkpointing:  # the recomputed layer exists only during backward
        estimate["llm_layers"] -= seq * planner._llm_layer_bytes_per_token(shape.llm, planner.PRECISION_BYTES[precision])
    workspace = planner.loss_workspace(shape, batch * seq, precision, chunk)
    expected = batch * (sum(estimate.values()) - estimate["loss_backward"]) + workspace["head_grad"]
    measured = sum(saved.values())
    print(f"activations {precision} ckpt={checkpointing} chunk={chunk}: measured {measured} estimated {expected} "
          f"ratio {expected / measured:.3f}")
    assert measured == pytest.approx(expected, rel=0.10), (measured, expected, estimate)


def test_the_chunked_loss_takes_the_logits_out_of_a_7b_plan(scenes, tmp_path, qwen2_7b_dir):
    """Qwen2-7B with LoRA at 2,048 tokens: the plain path's logits, log-probs and their gradients
    (12 B x 152,064 per token, 3.5 GiB) become an fp32 hidden-row gradient per token plus one chunk of
    fp32 logits per micro-batch; LoRA leaves the head frozen, so no head gradient is kept."""
    settings = _settings(scenes, tmp_path, llm={"path": str(qwen2_7b_dir), "config": None, "mode": "lora"})
    shape = planner.count_model(settings)
    assert shape.chunked_loss and not shape.head_trainable
    plain = planner.activation_breakdown(shape, 2048, "bf16", chunk_tokens=0)
    chunked = planner.activation_breakdown(shape, 2048, "bf16")
    assert plain["loss"] + plain["loss_backward"] == 2048 * 12 * 152064
    assert chunked["loss"] == 2048 * (4 * 3584 + 8) and chunked["loss_backward"] == 0
    work = planner.loss_workspace(shape, 2048, "bf16")
    assert work == {"loss_chunk": 1024 * 152064 * 6, "head_grad": 0, "head_grad_chunk": 0}

    def loss_share(tokens: int, chunk: int) -> int:  # what the head and the loss add per micro-batch of 1
        act = planner.activation_breakdown(shape, tokens, "bf16", chunk_tokens=chunk)
        return (act["llm_head"] + act["loss"] + act["loss_backward"]
                + sum(planner.loss_workspace(shape, tokens, "bf16", chunk).values()))

    assert loss_share(2048, 0) > 3.5 * loss_share(2048, 1024)
    assert loss_share(8192, 0) > 10 * loss_share(8192, 1024)  # the 8K-token (DeepKE) case
    full = planner.count_model(_settings(scenes, tmp_path, llm={"path": str(qwen2_7b_dir), "config": None,
                                                                 "mode": "full"}))
    assert planner.loss_workspace(full, 2048, "bf16")["head_grad"] == 4 * 152064 * 3584


# ---- the plan ---------------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("80GB") == parse_size("80G") == parse_size("80 GiB") == 80 * 2**30
    assert parse_size("512mb") == 512 * 2**20 and parse_size("1.5TB") == int(1.5 * 2**40)
    assert parse_size(24) == 24 * 2**30
    with pytest.raises(ConfigError, match="80 gigs"):
        parse_size("80 gigs")


def test_recommendation_is_the_fastest_option_that_fits(scenes, tmp_path, qwen2_7b_dir):
    settings = _settings(scenes, tmp_path, llm={"path": str(qwen2_7b_dir), "config": None, "mode": "full",
                                                 "gradient_checkpointing": True},
                         vision={"config": SIGLIP_SO400M, "mode": "frozen"})
    shape = planner.count_model(settings)
    result = planner.plan(shape, Hardware(8, parse_size("80GB")), "bf16", micro_batch=4, seq_len=2048)
    names = [e.option.name for e in result.estimates]
    assert names[:4] == ["zero0", "zero1", "zero2", "zero3"] and all("offload" in n for n in names[4:])
    first_fit = next(e for e in result.estimates if e.fits)
    assert result.recommended is first_fit and first_fit.option.name != "zero0"
    by_name = {e.option.name: e for e in result.estimates}
    assert not by_name["zero0"].fits  # 20 B x 7.6B trainable is more than 80 GB
    assert by_name["zero3"].gpu_total < by_name["zero2"].gpu_total < by_name["zero1"].gpu_total
    for e in result.estimates:  # the largest micro batch fits and one more does not
        m = e.max_micro_batch
        if m:
            args = (shape, e.option, result.hardware, "bf16")
            assert planner.estimate(*args, m, 2048).fits and not planner.estimate(*args, m + 1, 2048).fits
    # a small GPU: nothing fits micro batch 4 but ZeRO-3 with offload fits a smaller one
    small = planner.plan(shape, Hardware(8, parse_size("10GB")), "bf16", micro_batch=4, seq_len=2048)
    assert small.recommended is not None and not small.recommended.fits
    assert "offload" in small.recommended.option.name and 1 <= small.recommended.max_micro_batch < 4


def test_plan_7b_from_config_files_only(tmp_path, qwen2_7b_dir):
    """The shipped example: `zerovl plan` on a Qwen2-7B + SigLIP-so400m LLaVA-style config, where the
    model directory holds a config.json and a tokenizer only. Runs on a laptop in seconds."""
    cfg = {"model": {"vision": {"config": SIGLIP_SO400M, "mode": "frozen"}, "connector": {"type": "mlp"},
                     "llm": {"path": str(qwen2_7b_dir), "mode": "full", "gradient_checkpointing": True}},
           "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 2048},
           "train": {"precision": "bf16", "micro_batch_size": 4, "gradient_accumulation_steps": 4},
           "deepspeed": "zero2"}
    path = write_config(cfg, tmp_path / "llava_7b.yaml")
    proc = subprocess.run([sys.executable, "-m", "zerovl", "plan", str(path), "--gpus", "8", "--gpu-mem", "80GB",
                           "--cpu-mem", "512GB", "--json", str(tmp_path / "plan.json"), "train.micro_batch_size=2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # SigLIP-so400m's vision model is 428,225,600 parameters with its attention-pooling head, which a VLM
    # never uses and zerovl removes: 412,987,248 remain
    assert re.search(r"^llm\s+7\.62B\s+0$", out, re.M) and re.search(r"^vision\s+0\s+412\.99M$", out, re.M)
    assert "recommendation: deepspeed=zero1 train.micro_batch_size=2" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["micro_batch"] == 2 and plan["recommended"] == "zero1"
    assert plan["parameters"]["llm"]["trainable"] == 7_615_616_512  # Qwen2-7B's published count
    assert len(plan["estimates"]) == 8 and not plan["estimates"][0]["fits"]


def test_plan_reports_config_errors_in_one_line(tmp_path, scenes):
    path = write_config(tiny_config(scenes, tmp_path), tmp_path / "cfg.yaml")
    proc = subprocess.run([sys.executable, "-m", "zerovl", "plan", str(path), "--gpus", "2", "--gpu-mem", "lots"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "zerovl: error: cannot read memory size 'lots'; write it like 80GB, 40GiB or 512G"


def test_plan_offers_a_faster_option_with_a_smaller_micro_batch(scenes, tmp_path, qwen2_7b_dir):
    from zerovl.recipes.plan import format_plan

    settings = _settings(scenes, tmp_path, llm={"path": str(qwen2_7b_dir), "config": None, "mode": "lora",
                                                 "gradient_checkpointing": True},
                         vision={"config": SIGLIP_SO400M, "mode": "full"})
    shape = planner.count_model(settings)
    assert shape.parts["llm"].frozen == 7_615_616_512 and shape.parts["vision"].trainable == 412_987_248
    result = planner.plan(shape, Hardware(4, parse_size("24GB"), nodes=2), "bf16", micro_batch=4, seq_len=2048)
    assert result.recommended.option.name == "zero3" and result.recommended.fits
    text = format_plan(result, accumulation=4)
    assert "recommendation: deepspeed=zero3 train.micro_batch_size=4" in text
    zero0, zero1 = result.estimates[:2]
    assert zero0.max_micro_batch == 0 and 1 <= zero1.max_micro_batch < 4
    assert (f"alternative: deepspeed=zero1 train.micro_batch_size={zero1.max_micro_batch} "
            f"train.gradient_accumulation_steps={-(-16 // zero1.max_micro_batch)}") in text


def test_demo_config_counts_its_embeddings_only_vision_tower(scenes):
    """configs/demo.yaml's SigLIP has 0 encoder layers; 0 is a layer count, not a missing value."""
    from zerovl.config import load_config
    from zerovl.recipes.summary import part_counts

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.tokenizer={scenes['tokenizer']}"])
    counts = part_counts(cfg)
    built = build_model(cfg.model, "fp32")
    for part, named in named_parts(built.model).items():
        assert counts[part][0] == sum(p.numel() for _, p in named), part
