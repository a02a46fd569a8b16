"""CIFAR in the official "python version" format, made up and served locally: tiny archives
(`make_cifar10`, `make_cifar100`) and an HTTP server on 127.0.0.1 (`LocalServer`) that records
the paths it was asked for. Tests download from it through kdlab's real download path."""

from __future__ import annotations

import io
import pickle
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from kdlab.data.download import md5sum

# -- tiny archives in the CIFAR "python version" format ----------------------------------


def _legacy_pickle(obj) -> bytes:
    """Protocol 2 with the numpy-1 global names the official (Python 2) files carry."""
    raw = pickle.dumps(obj, protocol=2)
    return raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _balanced_labels(rng, n, classes):
    return rng.permutation(np.arange(n) % classes).tolist()


def _write_tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return md5sum(path)


def make_cifar10(directory: Path, per_batch=10, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    members, train_x, train_y = {}, [], []
    for i in range(1, 6):
        x, y = _images(rng, per_batch), _balanced_labels(rng, per_batch, 10)
        train_x.append(x)
        train_y += y
        members[f"cifar-10-batches-py/data_batch_{i}"] = _legacy_pickle(
            {"batch_label": f"training batch {i} of 5", "labels": y, "data": x,
             "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]})
    test_x, test_y = _images(rng, n_test), _balanced_labels(rng, n_test, 10)
    members["cifar-10-batches-py/test_batch"] = _legacy_pickle(
        {"batch_label": "testing batch 1 of 1", "labels": test_y, "data": test_x,
         "filenames": [f"test_{j}.png" for j in range(n_test)]})
    members["cifar-10-batches-py/batches.meta"] = _legacy_pickle(
        {"label_names": [f"class{c}" for c in range(10)], "num_cases_per_batch": per_batch,
         "num_vis": 3072})
    md5 = _write_tar(directory / "cifar-10-python.tar.gz", members)
    return md5, {"train_x": np.concatenate(train_x), "train_y": np.array(train_y),
                 "test_x": test_x, "test_y": np.array(test_y)}


def make_cifar100(directory: Path, n_train=300, n_test=100, seed=1, n_classes=100):
    """``n_classes < 100``: only the first classes occur (a tiny run can learn something)."""
    rng = np.random.default_rng(seed)
    train_x, train_y = _images(rng, n_train), np.array(_balanced_labels(rng, n_train, n_classes))
    test_x, test_y = _images(rng, n_test), np.array(_balanced_labels(rng, n_test, n_classes))
    # a shuffled fine -> coarse assignment, 5 fine classes per superclass
    fine_to_coarse = rng.permutation(np.arange(100) // 5)

    def batch(x, y):  # current numpy, default protocol: the "numpy._core" names
        return pickle.dumps({"filenames": [], "batch_label": "", "fine_labels": y.tolist(),
                             "coarse_labels": fine_to_coarse[y].tolist(), "data": x})

    members = {"cifar-100-python/train": batch(train_x, train_y),
               "cifar-100-python/test": batch(test_x, test_y),
               "cifar-100-python/meta": pickle.dumps(
                   {"fine_label_names": [f"f{c}" for c in range(100)],
                    "coarse_label_names": [f"c{c}" for c in range(20)]})}
    md5 = _write_tar(directory / "cifar-100-python.tar.gz", members)
    return md5, {"train_x": train_x, "train_y": train_y, "train_coarse": fine_to_coarse[train_y],
                 "test_x": test_x, "test_y": test_y}


# -- a local HTTP server ------------------------------------------------------------------


class _CountingHandler(SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path == "/truncated.tar.gz":  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


class LocalServer:
    def __init__(self, directory: Path):
        self.directory = directory
        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(_CountingHandler, directory=str(directory)))
        self.httpd.requests = []
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
