"""`zerovl --help` says what the product is and shows every command with an example."""

import subprocess
import sys

from zerovl.cli import EXAMPLES, build_parser


def test_help_describes_the_product_and_every_command():
    parser = build_parser()
    text = parser.format_help()
    assert "parse arguments" not in text  # the module's code comment is not the product's description
    assert "vision-language models" in text and "DeepSpeed ZeRO" in text
    commands = set(parser._subparsers._group_actions[0].choices)
    assert commands == set(EXAMPLES), "every command needs one example in zerovl --help, and only commands"
    for name in commands:
        assert f"\n  {name:<8} zerovl {name} " in text, name


def test_help_runs_from_the_console():
    proc = subprocess.run([sys.executable, "-m", "zerovl", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "commands, one example each:" in proc.stdout and "zerovl bench configs/demo.yaml" in proc.stdout
