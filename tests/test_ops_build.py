"""The ops build: cached library, helpful errors, concurrent first imports."""

import os
import subprocess
import sys

import pytest

import tf_custom_ops._build as ops_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_library_is_cached_per_tf_version_and_sources():
    path = ops_build.build()
    assert path.is_file()
    import tensorflow as tf

    assert f"tf{tf.__version__}-" in path.parent.name
    assert ops_build.build() == path  # second call: no rebuild


def test_missing_compiler_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("KPCONV_TF_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(ops_build.BuildError, match="install g\\+\\+"):
        ops_build.build()


def test_compiler_errors_are_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("KPCONV_TF_CACHE", str(tmp_path))
    broken = tmp_path / "src"
    broken.mkdir()
    (broken / "broken.cc").write_text("this is not C++;\n")
    monkeypatch.setattr(ops_build, "SOURCE_DIR", broken)
    with pytest.raises(ops_build.BuildError, match="broken.cc"):
        ops_build.build()


@pytest.mark.slow
def test_concurrent_first_imports_share_one_build(tmp_path):
    env = dict(os.environ, KPCONV_TF_CACHE=str(tmp_path), PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    code = (
        "import tf_custom_ops as o, numpy as np;"
        "print(o.neighbors(np.zeros((2,3),np.float32), np.zeros((2,3),np.float32), 1.0).numpy().tolist())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        assert out.strip().endswith("[[0, 1], [0, 1]]")
    libraries = list(tmp_path.glob("ops/*/kpconv_ops.so"))
    assert len(libraries) == 1
    assert not list(tmp_path.glob("ops/*/.*.tmp"))
