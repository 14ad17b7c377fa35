"""``kvplug list`` / ``kvplug show`` as a user runs them."""

import subprocess
import sys

from kvplug.registry import default_registry


def run(*args):
    return subprocess.run([sys.executable, "-m", "kvplug.cli", *args], capture_output=True, text=True,
                          env={"COLUMNS": "200", "PATH": ""})


def test_list_shows_every_part_with_its_ratio():
    out = run("list")
    assert out.returncode == 0
    for name in default_registry().names():
        assert f" {name} " in out.stdout
    assert "3.76x" in out.stdout  # int4 at head_dim 128: 512 / 136


def test_show_prints_parameters_and_memory_ratio():
    out = run("show", "snapkv(budget=512)+kivi(bits=2)", "--context", "8192")
    assert out.returncode == 0, out.stderr
    # 384 tokens at 2 * 32 + 2 * 4 * 128 / 32 = 96 bytes, the newest 128 at 512: 8192 * 512 / 102400
    for word in ("budget", "512", "residual", "128", "keeps 512 per head, the newest 128 in full precision", "40.96x"):
        assert word in out.stdout, word
    out = run("show", "int4(residual=32)", "--context", "8192")
    assert "3.72x" in out.stdout  # 8192 * 512 / (8160 * 136 + 32 * 512)


def test_bad_specs_exit_2_with_one_line():
    for spec, word in (("snapvk", "did you mean 'snapkv'"), ("kivi(bits=3)", "bits=3"), ("int4(group=48)", "group=48")):
        out = run("show", spec)
        assert out.returncode == 2
        assert out.stdout == "" and out.stderr.count("\n") == 1 and word in out.stderr
