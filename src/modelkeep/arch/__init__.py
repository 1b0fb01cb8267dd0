"""Architecture records: how a saved model is rebuilt without pickle and without running code from
the file.

A record is JSON in the ``modelkeep.architecture`` metadata key. Three strategies exist, each in its
own module:

- ``factories``: a call of a trusted builder (torchvision, timm, registered or trusted by name);
- ``modules``: a tree of built-in ``torch.nn`` layers with their constructor arguments;
- ``graph``: a ``torch.export`` program as JSON, checked against an allowlist before it is built.

``records`` holds the envelope and the JSON encoding of constructor arguments; ``rebuild`` builds
modules with parameters on the meta device and checks that a record rebuilds the model it came from.
Nothing heavy is imported here, so ``import modelkeep`` stays light.
"""
