"""Optimizer groups: no decay on biases and norms, per-part LRs, parts with one LR share groups."""

from torch import nn

from zerovl.engine.optim import param_groups


def _parts():
    vision = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    connector = nn.Linear(4, 4)
    llm = nn.Linear(4, 4)
    llm.weight.requires_grad_(False)  # a frozen tensor never reaches the optimizer
    return {"vision": list(vision.named_parameters()), "connector": list(connector.named_parameters()),
            "llm": list(llm.named_parameters())}


def test_shared_lr_merges_parts_and_splits_decay():
    groups = param_groups(_parts(), {"vision": 1e-3, "connector": 1e-3, "llm": 1e-3}, 0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"vision+connector.decay", "vision+connector+llm.no_decay"}
    assert len(by_name["vision+connector.decay"]["params"]) == 2  # two Linear weights
    assert len(by_name["vision+connector+llm.no_decay"]["params"]) == 5  # 2 biases + norm w/b + llm bias
    assert by_name["vision+connector.decay"]["weight_decay"] == 0.1
    assert by_name["vision+connector+llm.no_decay"]["weight_decay"] == 0.0


def test_own_lr_keeps_a_part_apart():
    groups = param_groups(_parts(), {"vision": 1e-4, "connector": 1e-3, "llm": 1e-3}, 0.0)
    lrs = {g["name"]: g["base_lr"] for g in groups}
    assert lrs == {"vision.decay": 1e-4, "vision.no_decay": 1e-4, "connector.decay": 1e-3,
                   "connector+llm.no_decay": 1e-3}
    assert sum(len(g["params"]) for g in groups) == 7
