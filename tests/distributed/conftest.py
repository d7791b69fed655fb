import json

import pytest

from zerovl.data.demo_scenes import SHAPES, SIDES


@pytest.fixture(scope="session")
def mixed_data(scenes, tmp_path_factory):
    """A JSONL whose first steps give rank 0 only text-only samples and rank 1 only image samples
    (unshuffled, 2 ranks, micro batch 2), followed by batches that mix both within a rank."""
    image_records = [json.loads(line) for line in scenes["train"].read_text().splitlines()]
    image_records = [r for r in image_records if r["images"]]
    for r in image_records:
        r["images"] = [str(scenes["train"].parent / p) for p in r["images"]]
    text = [{"messages": [{"role": "user", "content": f"how many sides does a {s} have ?"},
                          {"role": "assistant", "content": SIDES[s]}]} for s in SHAPES]
    lines = []
    for i in range(8):  # positions 0,2,4,6 -> rank 0 (text); 1,3,5,7 -> rank 1 (images)
        lines.append(text[i % 3] if i % 2 == 0 else image_records[i])
    for i in range(8, 24):  # pairs per rank: (text, image)
        lines.append(text[i % 3] if (i // 2) % 2 == 0 else image_records[i])
    path = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path
