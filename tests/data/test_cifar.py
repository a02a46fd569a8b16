"""CIFAR datamodules end to end: tiny archives in the official format, served over a local
HTTP server, through the real download / md5 / extract / read path."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from helpers.cifar import make_cifar10, make_cifar100

from kdlab.data.augment import CIFAR10_MEAN, CIFAR10_STD, normalize
from kdlab.data.cifar import Cifar10DataModule, Cifar100DataModule
from kdlab.data.download import DatasetError, download_and_extract, md5sum
from kdlab.data.noise import CIFAR10_ASYMMETRIC, superclass_ring

# `server`: a local HTTP server serving tiny archives (tests/data/conftest.py)


def _cifar10(server, root, **kwargs):
    md5, arrays = make_cifar10(server.directory)
    dm = Cifar10DataModule(root=str(root), url=server.url("cifar-10-python.tar.gz"), md5=md5,
                           batch_size=8, **kwargs)
    return dm, md5, arrays


# -- tests ----------------------------------------------------------------------------------


def test_cifar10_download_extract_and_exact_roundtrip(server, tmp_path):
    root = tmp_path / "data"
    dm, md5, arrays = _cifar10(server, root)
    dm.setup()
    assert server.requests == ["/cifar-10-python.tar.gz"]
    assert md5sum(root / "cifar-10-python.tar.gz") == md5
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(
        ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)])
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp leftovers

    data = dm.load()
    assert data["train_inputs"].dtype == torch.uint8
    assert data["train_inputs"].shape == (50, 3, 32, 32)
    expected_train = torch.from_numpy(arrays["train_x"].reshape(-1, 3, 32, 32))
    assert torch.equal(data["train_inputs"], expected_train)
    assert torch.equal(data["train_targets"], torch.from_numpy(arrays["train_y"]))
    assert torch.equal(data["test_inputs"],
                       torch.from_numpy(arrays["test_x"].reshape(-1, 3, 32, 32)))
    assert torch.equal(data["test_targets"], torch.from_numpy(arrays["test_y"]))
    assert "train_coarse" not in data
    # channel-major layout: the first 1024 bytes of a row are the red plane
    assert torch.equal(data["train_inputs"][0, 0].flatten(),
                       torch.from_numpy(arrays["train_x"][0, :1024]))

    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 40, "meta": 5, "val": 5, "test": 20}  # meta, val: 10% of 50 each
    assert dm.splits["val"] is not dm.splits["meta"]  # a separate val split by default
    assert dm.splits["train"].inputs.dtype == torch.uint8
    assert torch.equal(dm.splits["test"].inputs, data["test_inputs"])
    # train + meta + val together are exactly the 50 training rows
    rows = torch.cat([dm.splits[s].inputs for s in ("train", "meta", "val")]).flatten(1)
    assert sorted(map(bytes, rows.numpy())) == sorted(map(bytes, arrays["train_x"]))
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    assert dm.asymmetric_class_map == CIFAR10_ASYMMETRIC


def test_cifar100_download_with_coarse_labels(server, tmp_path):
    md5, arrays = make_cifar100(server.directory)
    root = tmp_path / "data"
    dm = Cifar100DataModule(root=str(root), url=server.url("cifar-100-python.tar.gz"), md5=md5)
    dm.setup()
    assert server.requests == ["/cifar-100-python.tar.gz"]
    assert (root / "cifar-100-python" / "train").is_file()
    data = dm.load()
    assert data["train_inputs"].dtype == torch.uint8
    assert torch.equal(data["train_inputs"],
                       torch.from_numpy(arrays["train_x"].reshape(-1, 3, 32, 32)))
    assert torch.equal(data["train_targets"], torch.from_numpy(arrays["train_y"]))
    assert torch.equal(data["train_coarse"], torch.from_numpy(arrays["train_coarse"]))
    assert torch.equal(data["test_inputs"],
                       torch.from_numpy(arrays["test_x"].reshape(-1, 3, 32, 32)))
    assert torch.equal(data["test_targets"], torch.from_numpy(arrays["test_y"]))
    assert {k: len(v) for k, v in dm.splits.items()} == {
        "train": 239, "meta": 30, "val": 31, "test": 100}  # 10% each, stratified (100 classes)
    assert dm.num_classes == 100 and dm.asymmetric_class_map is None


def test_cifar100_asymmetric_noise_uses_the_coarse_labels(server, tmp_path):
    md5, arrays = make_cifar100(server.directory)
    dm = Cifar100DataModule(root=str(tmp_path / "data"), md5=md5,
                            url=server.url("cifar-100-python.tar.gz"),
                            noise={"type": "asymmetric", "rate": 1.0})
    dm.setup()
    train = dm.splits["train"]
    ring = superclass_ring(torch.from_numpy(arrays["train_y"]),
                           torch.from_numpy(arrays["train_coarse"]))
    expected = torch.tensor([ring[int(c)] for c in train.clean_targets])
    assert torch.equal(train.targets, expected)


def test_cifar10_asymmetric_noise_uses_the_builtin_map(server, tmp_path):
    dm, _, _ = _cifar10(server, tmp_path / "data", noise={"type": "asymmetric", "rate": 1.0})
    dm.setup()
    train = dm.splits["train"]
    expected = torch.tensor([CIFAR10_ASYMMETRIC.get(int(c), int(c))
                             for c in train.clean_targets])
    assert torch.equal(train.targets, expected)


def test_second_setup_does_not_download_again(server, tmp_path):
    root = tmp_path / "data"
    dm, md5, arrays = _cifar10(server, root)
    dm.setup()
    assert len(server.requests) == 1
    again = Cifar10DataModule(root=str(root), url=server.url("cifar-10-python.tar.gz"), md5=md5)
    again.setup()
    assert len(server.requests) == 1
    # extracted files gone but the verified archive kept: re-extract without the network
    for p in (root / "cifar-10-batches-py").iterdir():
        p.unlink()
    (root / "cifar-10-batches-py").rmdir()
    third = Cifar10DataModule(root=str(root), url=server.url("cifar-10-python.tar.gz"), md5=md5)
    assert torch.equal(third.load()["train_targets"], torch.from_numpy(arrays["train_y"]))
    assert len(server.requests) == 1
    # a present-but-corrupt archive is fetched again
    (root / "cifar-10-python.tar.gz").write_bytes(b"truncated")
    for p in (root / "cifar-10-batches-py").iterdir():
        p.unlink()
    Cifar10DataModule(root=str(root), url=server.url("cifar-10-python.tar.gz"), md5=md5).load()
    assert len(server.requests) == 2


def test_wrong_md5_raises_and_leaves_nothing(server, tmp_path):
    root = tmp_path / "data"
    make_cifar10(server.directory)
    url = server.url("cifar-10-python.tar.gz")
    dm = Cifar10DataModule(root=str(root), url=url, md5="0" * 32)
    with pytest.raises(DatasetError, match="md5 mismatch") as info:
        dm.setup()
    message = str(info.value)
    assert url in message and "\n" not in message
    assert list(root.iterdir()) == []  # no archive, no .part file


def test_http_error_raises(server, tmp_path):
    url = server.url("nope.tar.gz")
    with pytest.raises(DatasetError, match="HTTP 404") as info:
        download_and_extract(url, "0" * 32, tmp_path / "data", progress=False)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert list((tmp_path / "data").iterdir()) == []


def test_truncated_download_raises(server, tmp_path):
    url = server.url("truncated.tar.gz")
    with pytest.raises(DatasetError, match="failed: incomplete, got 10 of 1000") as info:
        download_and_extract(url, "0" * 32, tmp_path / "data", progress=False)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize("url", ["notaurl://x/y.tar.gz", "y.tar.gz"])
def test_malformed_url_raises(tmp_path, url):
    with pytest.raises(DatasetError, match="unknown url type"):
        download_and_extract(url, "0" * 32, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_raises(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens on this port any more
    with pytest.raises(DatasetError, match="download of http://127.0.0.1"):
        download_and_extract(f"http://127.0.0.1:{port}/x.tar.gz", "0" * 32, tmp_path,
                             progress=False)


@pytest.mark.parametrize("progress", [True, False])
def test_download_off_and_missing_raises_one_line_with_the_directory(tmp_path, progress):
    root = tmp_path / "empty"
    for cls, folder in ((Cifar10DataModule, "cifar-10-batches-py"),
                        (Cifar100DataModule, "cifar-100-python")):
        dm = cls(root=str(root), download=False)
        with pytest.raises(DatasetError) as info:
            dm.setup()
        message = str(info.value)
        assert "\n" not in message
        assert str(root / folder) in message
        assert "dataset.download=true" in message and folder in message


def test_bad_archive_raises(server, tmp_path):
    garbage = b"this is not a tar archive" * 10
    (server.directory / "bad.tar.gz").write_bytes(garbage)
    md5 = hashlib.md5(garbage).hexdigest()
    with pytest.raises(DatasetError, match="bad archive") as info:
        download_and_extract(server.url("bad.tar.gz"), md5, tmp_path / "d", progress=False)
    assert "bad.tar.gz" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name,kind", [("../evil.txt", "file"), ("/tmp/kdlab-evil.txt", "file"),
                                       ("ok/../../evil.txt", "file"), ("ok/link", "symlink")])
def test_unsafe_members_are_refused(server, tmp_path, name, kind):
    archive = server.directory / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    dest = tmp_path / "a" / "b"
    with pytest.raises(DatasetError, match="refusing to extract"):
        download_and_extract(server.url("evil.tar.gz"), md5sum(archive), dest, progress=False)
    assert not (tmp_path / "a" / "evil.txt").exists()
    assert [p.name for p in dest.iterdir()] == ["evil.tar.gz"]


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    payload = pickle.dumps({"data": print, "labels": []})  # a global outside numpy
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(payload)
    dm = Cifar10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(DatasetError, match=r"unexpected global builtins\.print"):
        dm.load()


def test_preprocess_normalises_and_augments_train_batches(server, tmp_path):
    dm, _, _ = _cifar10(server, tmp_path / "data")
    dm.setup()
    batch = dm.splits["train"][list(range(8))]
    plain = normalize(batch["input"], CIFAR10_MEAN, CIFAR10_STD)

    evaluated = dm.preprocess(dict(batch), train=False)
    assert evaluated["input"].dtype == torch.float32
    assert torch.equal(evaluated["input"], plain)
    assert torch.equal(evaluated["target"], batch["target"])
    assert batch["input"].dtype == torch.uint8  # the stored batch is not modified

    torch.manual_seed(0)
    trained = dm.preprocess(dict(batch), train=True)
    torch.manual_seed(0)
    again = dm.preprocess(dict(batch), train=True)
    assert trained["input"].dtype == torch.float32 and trained["input"].shape == (8, 3, 32, 32)
    assert torch.equal(trained["input"], again["input"])  # seeded by the global RNG
    assert not torch.equal(trained["input"], plain)

    dm.augment = False
    assert torch.equal(dm.preprocess(dict(batch), train=True)["input"], plain)
