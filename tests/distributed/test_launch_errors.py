"""What a user sees when ranks launched on their behalf fail: the first rank's own error line."""

import pytest

from zerovl.errors import ConfigError
from zerovl.recipes.demo import run_demo

pytestmark = pytest.mark.distributed


def test_demo_reports_the_ranks_error_line(tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        run_demo(str(tmp_path / "demo"), 2, ["train.lr=-1"], train_images=16, val_images=4)
    message = str(err.value)
    assert message.startswith("demo training failed: [rank 0] ") and "train.lr: Input should be greater than 0" in message
    assert "To enable traceback" not in message
    assert "ChildFailedError" not in capsys.readouterr().out  # torchrun's teardown stays in the log
    assert "ChildFailedError" in (tmp_path / "demo" / "train.log").read_text()
