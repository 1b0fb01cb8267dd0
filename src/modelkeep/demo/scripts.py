"""The programs ``modelkeep demo`` runs in fresh processes, as ``str.format`` templates.

Each one counts the pickle globals it resolves (Python's ``pickle.find_class`` audit event fires
for every class or function a pickle names), times import, load and predict, and prints one JSON
line. The torch ones are the tutorial's own code, run for comparison.
"""

_PRELUDE = """
import json, sys, time
_globals = []
sys.addaudithook(lambda event, args: _globals.append(args[:2]) if event == "pickle.find_class" else None)
started = time.perf_counter()
import torch
torch.set_num_threads({threads})
"""

_REPORT = """
print(json.dumps({{"import": imported - started, "load": loaded - imported, "predict": done - loaded,
                  "pickle_globals": len(_globals), **extra}}))
"""

VGG_MODELKEEP = _PRELUDE + """
import torchvision  # imported by either side: the timings then compare loading alone
import modelkeep as mk
imported = time.perf_counter()
model = mk.load({path!r})
loaded = time.perf_counter()
predictions = mk.predict(model, {photos!r}, topk={topk})
done = time.perf_counter()
extra = {{"top": [[[r.label, r.index, r.probability] for r in p.top] for p in predictions]}}
""" + _REPORT

VGG_TORCH = _PRELUDE + """
import torchvision
from PIL import Image
imported = time.perf_counter()
model = torch.load({path!r}, weights_only=False)
model.eval()
loaded = time.perf_counter()
weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
transform = weights.transforms()
batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in {photos!r}])
with torch.no_grad():
    values, indices = model(batch).softmax(dim=1).topk({topk}, dim=1)
done = time.perf_counter()
labels = weights.meta["categories"]
extra = {{"top": [[[labels[i], i, p] for p, i in zip(v, ix)] for v, ix in zip(values.tolist(), indices.tolist())]}}
""" + _REPORT

PRETRAINED_MODELKEEP = """
import sys
sys.modules[{blocked!r}] = None  # any import of the model's own package now fails: the file must do
""" + _PRELUDE + """
import modelkeep as mk
imported = time.perf_counter()
model = mk.load({path!r})
loaded = time.perf_counter()
predictions = mk.predict(model, {photos!r}, topk={topk})
done = time.perf_counter()
extra = {{"top": [[[r.label, r.index, r.probability] for r in p.top] for p in predictions],
          "modules": sorted(m for m in sys.modules if m.startswith({blocked!r}) and sys.modules[m] is not None)}}
""" + _REPORT

DIGITS_MODELKEEP = _PRELUDE + """
import modelkeep as mk
imported = time.perf_counter()
model = mk.load({path!r})
loaded = time.perf_counter()
predictions = mk.predict(model, {inputs!r}, topk=1, batch_size=4096)
done = time.perf_counter()
mk.save_weights({{"logits": torch.stack([p.output for p in predictions])}}, {out!r})
extra = {{}}
""" + _REPORT

DIGITS_TORCH = _PRELUDE + """
import numpy as np
imported = time.perf_counter()
model = torch.load({path!r}, weights_only=False)
model.eval()
loaded = time.perf_counter()
with torch.no_grad():
    logits = model(torch.from_numpy(np.load({inputs!r})))
done = time.perf_counter()
np.save({out!r}, logits.numpy())
extra = {{}}
""" + _REPORT
