"""The naive weight average, the baseline of `python -m bench merge`.

What one writes without a streaming tool: load every model whole, average
get_weights() in NumPy, set_weights, save. It shares no code with merge/.

    python bench/naive_average.py a.keras b.keras ... -o avg.keras
"""
import argparse

import keras
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--out", required=True)
    a = p.parse_args()
    models = [keras.models.load_model(path, compile=False) for path in a.inputs]
    weights = [m.get_weights() for m in models]
    average = [np.mean(per_input, axis=0) for per_input in zip(*weights)]
    models[0].set_weights(average)
    models[0].save(a.out)


if __name__ == "__main__":
    main()
