"""Score images with a model `adkit export --format onnx` wrote, with onnxruntime, numpy and Pillow alone.
The decision threshold is an input: model.json's fitted one here; feed your own to move it."""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

folder = Path(sys.argv[1])  # the export folder: model.onnx and model.json
card = json.loads((folder / "model.json").read_text())
size = card["input"]["shape"][-1]
session = ort.InferenceSession(str(folder / card["file"]), providers=["CPUExecutionProvider"])
for path in sys.argv[2:]:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)  # adkit resizes alike
    x = (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]  # (1, 3, S, S) in [0, 1]
    threshold = np.array(card["threshold"], dtype=np.float32)  # () float32
    anomaly_map, score, decision = session.run(None, {"images": x, "threshold": threshold})
    print(f"{path}\t{score[0]:.6g}\t{'anomalous' if decision[0] else 'normal'}")
