"""Fashion-MNIST on made-up files in the official IDX format: the reader, where each file is
taken from (root, then the system copy, then a download from a local 127.0.0.1 server), one
line for every bad file or missing data, the device-side preprocessing, the asymmetric map,
and a tiny `kdlab train dataset=fashion_mnist` with the every-view teacher cache."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
import torch.nn.functional as F
from helpers.cli import cli
from helpers.fashion_mnist import NAMES, make_fashion_mnist, use_checksums, write_gz

from kdlab.data.download import DatasetError
from kdlab.data.fashion_mnist import FashionMnistDataModule, read_idx
from kdlab.errors import ConfigError

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def module(root, system_root=None, **kwargs) -> FashionMnistDataModule:
    return FashionMnistDataModule(root=str(root), system_root=system_root and str(system_root),
                                  batch_size=8, **kwargs)


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# -- the IDX reader --------------------------------------------------------------------------


def test_read_idx_of_a_header_written_by_hand():
    data = b"\x00\x00\x08\x02" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x03" + bytes(range(6))
    assert read_idx(data).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert read_idx(b"\x00\x00\x08\x01\x00\x00\x00\x00").shape == (0,)


@pytest.mark.parametrize("data,words", [
    (b"\x00\x00", "shorter than the IDX magic"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "0x00000d01"),       # float data, not uint8
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "0x01000801"),
    (b"\x00\x00\x08\x00", "0x00000800"),                           # no dimensions
    (b"\x00\x00\x08\x02\x00\x00\x00\x01", "inside the IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "3 bytes of data, the file has 2"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "1 bytes of data, the file has 2"),
])
def test_read_idx_refuses_what_is_not_uint8_idx(data, words):
    with pytest.raises(ValueError, match=words):
        read_idx(data)


# -- reading, search order, download ---------------------------------------------------------


def test_generated_files_are_read_exactly(tmp_path, monkeypatch):
    checksums, arrays = make_fashion_mnist(tmp_path / "root", n_train=60, n_test=20)
    use_checksums(monkeypatch, checksums)
    dm = module(tmp_path / "root", download=False)
    data = dm.load()
    assert data["train_inputs"].dtype == torch.uint8
    assert data["train_inputs"].shape == (60, 1, 28, 28)
    assert torch.equal(data["train_inputs"][:, 0], torch.from_numpy(arrays["train_x"]))
    assert torch.equal(data["test_inputs"][:, 0], torch.from_numpy(arrays["test_x"]))
    assert data["train_targets"].tolist() == arrays["train_y"].tolist()
    assert data["test_targets"].tolist() == arrays["test_y"].tolist()
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 48, "meta": 6, "val": 6,
                                                         "test": 20}
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    assert list(dm.class_names) == CLASSES


def test_root_then_system_copy_then_download(tmp_path, server, monkeypatch):
    checksums, arrays = make_fashion_mnist(server.directory, seed=1)
    use_checksums(monkeypatch, checksums)
    system = tmp_path / "system"
    system.mkdir()
    names = list(NAMES.values())
    for name in names[:2]:  # the train files: in the system copy
        (system / name).write_bytes((server.directory / name).read_bytes())
    root = tmp_path / "root"
    root.mkdir()
    (root / names[2]).write_bytes((server.directory / names[2]).read_bytes())  # test images
    system.chmod(0o555)
    before = snapshot(system)

    dm = module(root, system, url=server.url(""))
    assert [dm.source(n) for n in names] == [system / names[0], system / names[1],
                                             root / names[2], None]
    data = dm.load()
    assert server.requests == ["/" + names[3]]  # only the file in neither place
    assert (root / names[3]).read_bytes() == (server.directory / names[3]).read_bytes()
    assert torch.equal(data["train_inputs"][:, 0], torch.from_numpy(arrays["train_x"]))
    assert data["test_targets"].tolist() == arrays["test_y"].tolist()
    assert snapshot(system) == before  # the system copy is only read
    assert sorted(p.name for p in root.iterdir()) == sorted(names[2:])  # no temp leftovers

    # a file in root wins over the system copy
    (root / names[0]).write_bytes((system / names[0]).read_bytes())
    assert module(root, system).source(names[0]) == root / names[0]
    system.chmod(0o755)


def test_system_copy_alone_needs_no_root(tmp_path, monkeypatch):
    system = tmp_path / "system"
    checksums, arrays = make_fashion_mnist(system)
    use_checksums(monkeypatch, checksums)
    dm = module(tmp_path / "root", system, download=False)
    dm.check()
    assert dm.load()["test_targets"].tolist() == arrays["test_y"].tolist()
    assert not (tmp_path / "root").exists()


def test_download_is_md5_checked_and_leaves_nothing_when_wrong(tmp_path, server, monkeypatch):
    checksums, _ = make_fashion_mnist(server.directory)
    name = NAMES["train_x"]
    checksums[name] = {**checksums[name], "md5": "0" * 32}
    use_checksums(monkeypatch, checksums)
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match="md5 mismatch") as info:
        module(root, url=server.url("")).load()
    assert server.url(name) in str(info.value) and "\n" not in str(info.value)
    assert name not in {p.name for p in root.iterdir()}
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_download_off_and_no_data_says_where_and_how(tmp_path):
    root, system = tmp_path / "root", tmp_path / "system"
    with pytest.raises(DatasetError) as info:
        module(root, system, download=False).check()
    message = str(info.value)
    assert "\n" not in message
    for words in (str(root), str(system), "apt-get install dataset-fashion-mnist",
                  "dataset.download=true", *NAMES.values()):
        assert words in message


# -- bad files: one line naming the file, the expected checksum and the fix -------------------


def _damage(path, how):
    content = gzip.decompress(path.read_bytes())
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "not gzip":
        path.write_bytes(content)
    elif how == "wrong magic":
        write_gz(path, b"\x00\x00\x09" + content[3:])
    elif how == "wrong content":  # a valid IDX file, one pixel changed
        write_gz(path, content[:-1] + bytes([(content[-1] + 1) % 256]))
    elif how == "one byte short":
        write_gz(path, content[:-1])


@pytest.mark.parametrize("how,words", [
    ("truncated", "gzip data is truncated or damaged"),
    ("not gzip", "gzip data is truncated or damaged"),
    ("wrong magic", "IDX magic number 0x00000903"),
    ("wrong content", "its content has sha256"),
    ("one byte short", "the file has 47039"),
])
@pytest.mark.parametrize("where", ["root", "system"])
def test_a_bad_file_is_one_line_with_the_checksum_and_the_fix(tmp_path, monkeypatch, how, words,
                                                            where):
    folder = tmp_path / where
    checksums, _ = make_fashion_mnist(folder, n_train=60)
    use_checksums(monkeypatch, checksums)
    name = NAMES["train_x"]  # 60 x 28 x 28 + 16 = 47,056 bytes
    _damage(folder / name, how)
    dm = module(tmp_path / "root", tmp_path / "system")
    with pytest.raises(DatasetError) as info:
        dm.check()  # before any run: no run directory (see test_bad_data_creates_no_run_dir)
    message = str(info.value)
    assert "\n" not in message and words in message
    assert str(folder / name) in message
    assert f"sha256 {checksums[name]['sha256']} ({checksums[name]['size']} bytes)" in message
    fix = ("apt-get install --reinstall dataset-fashion-mnist" if where == "system"
           else "delete it and run again")
    assert fix in message
    with pytest.raises(DatasetError, match=words):
        module(tmp_path / "root", tmp_path / "system").load()  # never a partial dataset


def test_bad_data_creates_no_run_dir(tmp_path, monkeypatch):
    checksums, _ = make_fashion_mnist(tmp_path / "root")
    use_checksums(monkeypatch, checksums)
    _damage(tmp_path / "root" / NAMES["test_y"], "wrong content")
    out = cli("train", "dataset=fashion_mnist", f"dataset.root={tmp_path / 'root'}",
              "dataset.system_root=null", "method=ce", "trainer=cpu",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 1
    assert len(out.error_lines) == 1 and NAMES["test_y"] in out.error_lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


# -- preprocessing, noise --------------------------------------------------------------------


def test_preprocess_normalises_and_crops_with_padding_2(tmp_path, monkeypatch):
    checksums, _ = make_fashion_mnist(tmp_path / "root")
    use_checksums(monkeypatch, checksums)
    dm = module(tmp_path / "root")
    dm.setup()
    batch = dm.splits["train"][list(range(8))]
    expected = (batch["input"].float() / 255 - 0.2860) / 0.3530
    evaluated = dm.preprocess(dict(batch), train=False)
    torch.testing.assert_close(evaluated["input"], expected)
    assert dm.augmentation_views == 50  # (2 * 2 + 1)^2 offsets x 2 flips

    torch.manual_seed(0)
    trained = dm.preprocess(dict(batch), train=True)
    padded = F.pad(batch["input"].float(), (2, 2, 2, 2))
    for i, v in enumerate(trained["view"].tolist()):  # the view it reports is the crop it made
        cell, flip = divmod(v, 2)
        top, left = divmod(cell, 5)
        crop = padded[i, :, top:top + 28, left:left + 28]
        crop = crop.flip(-1) if flip else crop
        torch.testing.assert_close(trained["input"][i], (crop / 255 - 0.2860) / 0.3530)

    plain = module(tmp_path / "root", augment=False)
    plain.setup()
    assert plain.augmentation_views == 0 and plain.deterministic_train
    torch.testing.assert_close(plain.preprocess(dict(batch), train=True)["input"], expected)


@pytest.mark.parametrize("padding", [-1, 1.5])
def test_padding_is_a_whole_number_of_pixels(tmp_path, padding):
    with pytest.raises(ConfigError, match="dataset.padding must be a whole number >= 0"):
        module(tmp_path, padding=padding)


def test_asymmetric_noise_uses_the_builtin_map(tmp_path, monkeypatch):
    checksums, _ = make_fashion_mnist(tmp_path / "root", n_train=200)
    use_checksums(monkeypatch, checksums)
    dm = module(tmp_path / "root", noise={"type": "asymmetric", "rate": 1.0})
    dm.setup()
    by_name = {"T-shirt/top": "Shirt", "Shirt": "T-shirt/top", "Pullover": "Coat",
               "Coat": "Pullover", "Sneaker": "Ankle boot", "Ankle boot": "Sneaker"}
    flip = {CLASSES.index(a): CLASSES.index(b) for a, b in by_name.items()}
    train = dm.splits["train"]
    expected = [flip.get(int(c), int(c)) for c in train.clean_targets]
    assert train.targets.tolist() == expected
    assert dm.realised_noise_rate == pytest.approx(
        sum(int(c) in flip for c in train.clean_targets) / len(train))


# -- a tiny run through the command line -----------------------------------------------------


def test_a_tiny_run_with_the_view_cache(tmp_path, monkeypatch):
    checksums, _ = make_fashion_mnist(tmp_path / "root", n_train=100, n_test=30, learnable=True)
    use_checksums(monkeypatch, checksums)
    env = {"KDLAB_CACHE_DIR": str(tmp_path / "cache")}
    out = cli("train", "dataset=fashion_mnist", f"dataset.root={tmp_path / 'root'}",
              "dataset.system_root=null", "dataset.download=false", "dataset.batch_size=16",
              "method=kd", "student=cnn_small", "teacher=cnn", "teacher.width=4",
              "teacher.max_epochs=1", "teacher_cache=views", "trainer=cpu",
              "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "num_threads=1",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished"
    assert results["throughput"]["teacher_cache_s"] > 0
    # one teacher x 80 train examples (100 - 10 meta - 10 val) x 5 x 5 x 2 views x 10 classes
    metas = list((tmp_path / "cache" / "teacher_logits").glob("*.views.json"))
    assert [json.loads(p.read_text())["shape"] for p in metas] == [[1, 80, 50, 10]]
    assert json.loads(metas[0].read_text())["views_done"] == 50
