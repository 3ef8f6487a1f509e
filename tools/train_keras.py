"""A Keras CNN trained on Fashion-MNIST and exported by tf2onnx: a model from another tool chain.

Needs TensorFlow and tf2onnx, which the project does not depend on; run it in their own
environment, e.g.

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tfenv/bin/python tools/train_keras.py --out tools/teachers/keras_cnn.onnx

The model is what a Keras tutorial writes: NHWC input scaled to [0, 1], Conv2D + BatchNormalization
+ ReLU blocks with max pooling, Flatten, Dense, softmax output. tf2onnx turns it into NCHW convs
behind a Transpose, batch norms into Mul/Add, the Flatten into Transpose + Reshape. Weights depend
on TensorFlow's kernels, so a retrained file differs in its last digits; the one in
tools/teachers/ is the reference. Writes MODEL, MODEL.preprocess.json and MODEL.json (the facts).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist  # noqa: E402


def build(keras):
    inputs = keras.Input((28, 28, 1), name="image")
    x = inputs
    for width in (32, 64):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="probs")(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    from tensorflow import keras

    keras.utils.set_random_seed(0)
    (x, y), (xt, yt) = fmnist.load("train"), fmnist.load("t10k")
    scale = lambda a: (a.astype(np.float32) / 255.0)[..., None]  # noqa: E731
    model = build(keras)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(scale(x), y, batch_size=128, epochs=args.epochs, verbose=2)
    accuracy = float(model.evaluate(scale(xt), yt, verbose=0)[1])
    spec = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(args.out))
    args.out.with_suffix(".preprocess.json").write_text(
        json.dumps({"size": [28, 28], "channels": "gray", "scale": 255, "layout": "NHWC"}) + "\n")
    facts = {"architecture": "Keras CNN: 2 x (Conv2D 3x3 no bias, BatchNormalization, ReLU, MaxPooling2D) "
             "32/64 channels, Flatten, Dense 64 ReLU, Dense 10 softmax",
             "epochs": args.epochs, "test_accuracy": accuracy, "parameters": int(model.count_params()),
             "exported_by": f"tf2onnx {tf2onnx.__version__}, tensorflow {tf.__version__}, opset 17"}
    args.out.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
