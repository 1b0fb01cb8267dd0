"""Predictions from a model or a saved file alone: the inference spec (``spec``), input reading
and preprocessing (``preprocess``), and the batched run with labels and top-k (``pipeline``).

The package is named ``inference`` so that no public name of ``modelkeep`` shadows it:
``modelkeep.predict`` is the function ``pipeline.predict``, and ``import modelkeep.inference.spec``
works. (Not to be confused with ``modelkeep.inference``, the metadata key where a saved file keeps
its inference spec: see ``spec``.)

It imports none of its modules: ``models`` uses ``spec`` and ``pipeline`` uses ``models``, so the
package itself stays below both (the public names are exported by ``modelkeep``).
"""
