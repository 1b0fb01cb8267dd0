"""The public surface is deliberate: ``__all__`` is sorted, complete and importable."""

import modelkeep


def test_all_is_sorted_and_importable() -> None:
    names = modelkeep.__all__
    assert list(names) == sorted(names)
    for name in names:
        assert hasattr(modelkeep, name), name


def test_error_tree_inherits_builtins() -> None:
    assert issubclass(modelkeep.FormatError, ValueError)
    assert issubclass(modelkeep.StorageError, OSError)
    assert issubclass(modelkeep.KeyMismatchError, KeyError)
    assert issubclass(modelkeep.UnsafeContentError, modelkeep.FormatError)
    for name in ("FormatError", "IntegrityError", "KeyMismatchError", "ArchitectureError", "StorageError"):
        assert issubclass(getattr(modelkeep, name), modelkeep.ModelkeepError)
