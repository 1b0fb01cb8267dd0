"""Named pretrained weights: resolving torchvision's entries, the download (local HTTP server:
resume, timeout, hash check), torch's hub cache, a file the user names, and the modelkeep cache."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
import time
from typing import Iterator

import pytest
import torch

import modelkeep as mk
from modelkeep import download, errors, format, pretrained, reading
from helpers import assert_same

FACTORY = "tests.tiny_mlp"


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def checkpoint_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def hashed_name(data: bytes, stem: str = "tiny") -> str:
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:10]}.pth"


class Server:
    """A loopback HTTP server for checkpoints, honouring Range, with scripted misbehaviour."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_first = 0  # responses that stop halfway, then close the connection
        self.stall_seconds = 0.0
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if server.stall_seconds:
                    time.sleep(server.stall_seconds)
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                ranged = self.headers.get("Range")
                if ranged and not server.ignore_range:
                    start = int(ranged.split("=", 1)[1].split("-", 1)[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_first > 0:
                    server.drop_first -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/models"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    running.thread.start()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MODELKEEP_CACHE", str(tmp_path / "mk-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("MODELKEEP_WEIGHTS_MIRROR", raising=False)
    yield
    pretrained._REGISTRY.clear()


SPEC = mk.InferenceSpec(input_shape=("batch", 4), labels=("a", "b", "c"))


def register(url: str) -> pretrained.WeightsEntry:
    return pretrained.register_weights(FACTORY, "V1", url=url, inference=SPEC)


def leftovers(tmp_path) -> list[str]:
    folder = tmp_path / "mk-cache" / "downloads"
    return sorted(os.listdir(folder)) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# Resolving names


def test_torchvision_entry_resolves_to_the_real_url_hash_and_spec() -> None:
    entry = pretrained.resolve("torchvision:vgg16", "IMAGENET1K_V1")
    assert entry.factory == "torchvision.models.vgg16"
    assert entry.url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert entry.download_url == entry.url  # no mirror configured: the real URL is the one fetched
    assert entry.hash_prefix == "397923af"
    assert entry.kwargs == {"num_classes": 1000}
    assert entry.cache_name == "vgg16-397923af.safetensors"
    spec = mk.InferenceSpec.from_json(entry.inference)
    assert spec.labels[:2] == ("tench", "goldfish") and spec.image.center_crop == (224, 224)
    assert pretrained.resolve("torchvision.models.vgg16", "VGG16_Weights.IMAGENET1K_V1") == entry
    assert pretrained.resolve("torchvision:vgg16", "DEFAULT").name == "IMAGENET1K_V1"
    assert pretrained.builder_kwargs("torchvision:googlenet", "DEFAULT") == {"num_classes": 1000, "transform_input": True}
    assert pretrained.builder_kwargs("torchvision:vit_b_16", "IMAGENET1K_SWAG_E2E_V1")["image_size"] == 384


def test_mirror_replaces_the_folder_of_the_url(monkeypatch) -> None:
    monkeypatch.setenv("MODELKEEP_WEIGHTS_MIRROR", "http://mirror.local/pytorch/")
    entry = pretrained.resolve("torchvision:resnet18", "IMAGENET1K_V1")
    assert entry.download_url == "http://mirror.local/pytorch/resnet18-f37072fd.pth"


def test_unknown_names_are_architecture_errors() -> None:
    with pytest.raises(errors.ArchitectureError, match="IMAGENET1K_V1, IMAGENET1K_FEATURES"):
        pretrained.resolve("torchvision:vgg16", "IMAGENET9K")
    with pytest.raises(errors.ArchitectureError, match="list_models"):
        pretrained.resolve("torchvision:not_a_model", "DEFAULT")
    with pytest.raises(errors.ArchitectureError, match="register_weights"):
        pretrained.resolve("mypackage.build", "V1")


def test_densenet_keys_are_renamed_like_torchvision() -> None:
    state = {"features.denseblock1.denselayer1.norm.1.weight": torch.ones(1), "classifier.bias": torch.ones(1)}
    fitted = pretrained._fit_keys(state, "torchvision.models.densenet121")
    assert list(fitted) == ["features.denseblock1.denselayer1.norm1.weight", "classifier.bias"]
    assert pretrained._fit_keys(state, "torchvision.models.vgg16") is state


# --------------------------------------------------------------------------------------------
# Downloading


def test_download_converts_caches_and_loads(server: Server, tmp_path) -> None:
    reference = tiny_model()
    data = checkpoint_bytes(reference)
    name = hashed_name(data)
    server.files[name] = data
    entry = register(server.url(name))

    model = tiny_model(seed=1)
    returned = pretrained.load_named_weights(model, factory=FACTORY, weights="V1")
    assert returned == SPEC.to_json()
    assert_same(model, reference)
    assert not model.training
    assert server.requests == [(name, None)]

    cached = pretrained.cached_path(entry)
    assert cached == str(tmp_path / "mk-cache" / "weights" / name.replace(".pth", ".safetensors"))
    header = reading.read_header(cached)
    assert header.kind == "weights"
    assert header.metadata["source_sha256"] == hashlib.sha256(data).hexdigest()
    assert header.metadata["source_url"] == server.url(name)
    assert mk.verify(cached).ok
    assert leftovers(tmp_path) == []  # no pickle file and no partial file kept

    server.httpd.shutdown()  # later loads never touch the network
    again = tiny_model(seed=2)
    pretrained.load_named_weights(again, factory=FACTORY, weights="V1")
    assert_same(again, reference)
    assert len(server.requests) == 1


def test_download_into_a_meta_device_model(server: Server) -> None:
    reference = tiny_model()
    data = checkpoint_bytes(reference)
    server.files[hashed_name(data)] = data
    register(server.url(hashed_name(data)))
    with torch.device("meta"):
        model = tiny_model()
    pretrained.load_named_weights(model, factory=FACTORY, weights="V1")
    assert_same(model, reference)


def test_dropped_connection_resumes_with_range(server: Server, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(download, "CHUNK_BYTES", 16384)
    data = checkpoint_bytes(torch.nn.Linear(256, 256))
    name = hashed_name(data)
    server.files[name] = data
    server.drop_first = 1  # the first response stops halfway and the connection closes
    fetched = download.download(server.url(name), tmp_path / name, hash_prefix=name[5:15], backoff=0, progress=False)
    assert open(fetched.path, "rb").read() == data
    kept = (len(data) // 2) // 16384 * 16384  # whole chunks received before the drop
    assert kept > 0
    assert server.requests == [(name, None), (name, f"bytes={kept}-")]
    assert not os.path.exists(str(tmp_path / name) + ".partial")


def test_partial_file_from_an_earlier_call_is_resumed(server: Server, tmp_path) -> None:
    data = checkpoint_bytes(tiny_model())
    name = hashed_name(data)
    server.files[name] = data
    (tmp_path / (name + ".partial")).write_bytes(data[:1000])
    fetched = download.download(server.url(name), tmp_path / name, hash_prefix=name[5:15], progress=False)
    assert open(fetched.path, "rb").read() == data
    assert server.requests == [(name, "bytes=1000-")]


def test_server_ignoring_range_starts_over(server: Server, tmp_path) -> None:
    data = checkpoint_bytes(tiny_model())
    name = hashed_name(data)
    server.files[name] = data
    server.ignore_range = True
    (tmp_path / (name + ".partial")).write_bytes(b"stale bytes")
    fetched = download.download(server.url(name), tmp_path / name, hash_prefix=name[5:15], progress=False)
    assert open(fetched.path, "rb").read() == data


def test_stale_partial_longer_than_the_file_starts_over(server: Server, tmp_path) -> None:
    data = checkpoint_bytes(tiny_model())
    name = hashed_name(data)
    server.files[name] = data
    (tmp_path / (name + ".partial")).write_bytes(b"x" * (len(data) + 10))
    fetched = download.download(server.url(name), tmp_path / name, hash_prefix=name[5:15], backoff=0, progress=False)
    assert open(fetched.path, "rb").read() == data


def test_timeout_is_a_storage_error(server: Server, tmp_path) -> None:
    server.files["slow-00.pth"] = b"x"
    server.stall_seconds = 1.5
    with pytest.raises(errors.StorageError, match="timed out after 2 attempts") as caught:
        download.download(server.url("slow-00.pth"), tmp_path / "slow-00.pth", timeout=0.2, retries=1, backoff=0, progress=False)
    assert caught.value.path == server.url("slow-00.pth")
    assert not (tmp_path / "slow-00.pth").exists()


def test_wrong_hash_is_integrity_error_and_keeps_nothing(server: Server, tmp_path) -> None:
    data = checkpoint_bytes(tiny_model())
    server.files["tiny-deadbeef.pth"] = data
    entry = register(server.url("tiny-deadbeef.pth"))
    with pytest.raises(errors.IntegrityError, match="deadbeef"):
        pretrained.load_named_weights(tiny_model(), factory=FACTORY, weights="V1")
    assert not os.path.exists(pretrained.cached_path(entry))
    assert leftovers(tmp_path) == []
    assert [n for n in os.listdir(tmp_path / "mk-cache" / "weights") if not n.endswith(".lock")] == []


def test_http_errors_and_unreachable_hosts(server: Server, tmp_path) -> None:
    with pytest.raises(errors.StorageError, match="HTTP 404"):
        download.download(server.url("missing-00.pth"), tmp_path / "m.pth", progress=False)
    port = server.httpd.server_address[1]
    server.httpd.shutdown()
    server.httpd.server_close()
    with pytest.raises(errors.StorageError, match="after 1 attempts"):
        download.download(f"http://127.0.0.1:{port}/x-00.pth", tmp_path / "x.pth", retries=0, progress=False)


# --------------------------------------------------------------------------------------------
# Local copies


def test_torch_hub_cache_is_used_without_network(tmp_path) -> None:
    reference = tiny_model()
    data = checkpoint_bytes(reference)
    name = hashed_name(data)
    register(f"http://127.0.0.1:9/unreachable/{name}")
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / name).write_bytes(data)
    assert pretrained.local_source(FACTORY, "V1") == str(hub / name)
    model = tiny_model(seed=3)
    pretrained.load_named_weights(model, factory=FACTORY, weights="V1")
    assert_same(model, reference)
    assert pretrained.local_source(FACTORY, "V1").endswith(".safetensors")  # now the modelkeep copy


def test_damaged_hub_cache_file_is_refused(tmp_path) -> None:
    data = checkpoint_bytes(tiny_model())
    name = hashed_name(data)
    register(f"http://127.0.0.1:9/unreachable/{name}")
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / name).write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(errors.IntegrityError, match="hub cache"):
        pretrained.load_named_weights(tiny_model(), factory=FACTORY, weights="V1")


def test_file_named_by_the_user(tmp_path) -> None:
    reference = tiny_model()
    data = checkpoint_bytes(reference)
    register(f"http://127.0.0.1:9/unreachable/{hashed_name(data)}")
    (tmp_path / "mine.pth").write_bytes(data)
    model = tiny_model(seed=4)
    pretrained.load_named_weights(model, factory=FACTORY, weights="V1", path=tmp_path / "mine.pth")
    assert_same(model, reference)
    mk.save_weights(reference, tmp_path / "mine.safetensors")
    other = tiny_model(seed=5)
    pretrained.load_named_weights(other, factory=FACTORY, weights="V1", path=tmp_path / "mine.safetensors")
    assert_same(other, reference)
    with pytest.raises(errors.StorageError, match="no such file"):
        pretrained.load_named_weights(other, factory=FACTORY, weights="V1", path=tmp_path / "absent.pth")


def test_model_that_does_not_fit_is_refused_before_loading(tmp_path) -> None:
    register("http://127.0.0.1:9/unreachable/tiny-00.pth")
    mk.save_weights(tiny_model(), tmp_path / "w.safetensors")
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 5))
    before = wrong.state_dict()["0.weight"].clone()
    with pytest.raises(errors.KeyMismatchError, match=r"shape differs: 2.weight: checkpoint \[3, 8\], model \[5, 8\]"):
        pretrained.load_named_weights(wrong, factory=FACTORY, weights="V1", path=tmp_path / "w.safetensors")
    assert torch.equal(wrong.state_dict()["0.weight"], before)


def test_cached_file_is_plain_safetensors(server: Server) -> None:
    from safetensors.torch import load_file

    reference = tiny_model()
    data = checkpoint_bytes(reference)
    server.files[hashed_name(data)] = data
    entry = register(server.url(hashed_name(data)))
    pretrained.fetch(entry, progress=False)
    loaded = load_file(pretrained.cached_path(entry))
    assert set(loaded) == set(reference.state_dict())
    assert format.KEY_KIND in reading.read_header(pretrained.cached_path(entry)).metadata
