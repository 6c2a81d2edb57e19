"""The README's own-script example runs as written (on fewer shapes) and its loss falls."""

import re
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The README's config on fewer shapes and shorter epochs (~2 min here).
SMALL = ["dataset.extra={train_per_class: 10, test_per_class: 2, seed: 0}", "train.epoch_steps=15"]


def readme_script():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Optimizers, learning-rate schedule and callbacks") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_fit_script_trains(private_cache, monkeypatch):
    monkeypatch.chdir(ROOT)
    script = readme_script()
    assert "keras.optimizers.AdamW(1e-3)" in script and "EarlyStopping" in script
    call = 'load_config("embedded_shapes")'
    assert call in script
    keras.utils.set_random_seed(0)
    namespace = {}
    exec(script.replace(call, f'load_config("embedded_shapes", {SMALL!r})'), namespace)  # noqa: S102
    model, losses = namespace["model"], namespace["history"].history["loss"]
    assert isinstance(model.optimizer, keras.optimizers.AdamW)
    assert len(losses) == 2 and losses[1] < losses[0], losses
