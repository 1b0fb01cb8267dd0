"""Architecture records: how a saved model is rebuilt without pickle and without running code from
the file.

A record is JSON in the ``modelkeep.architecture`` metadata key. Three strategies exist, each in its
own module:

- ``factories``: a call of a trusted builder (torchvision, timm, registered or trusted by name);
- ``modules``: a tree of built-in ``torch.nn`` layers with their constructor arguments;
- ``graph``: a ``torch.export`` program as JSON, checked by ``programs`` (a positive list of
  operators, names and expressions) before torch builds it.

``records`` holds the envelope and the JSON encoding of constructor arguments; ``verify`` proves at
save time that a record rebuilds the model it came from; ``rebuild`` builds modules with their
parameters on the meta device and fills them from a file. Nothing heavy is imported here, so
``import modelkeep`` stays light.
"""
