"""download_omniglot against a local HTTP server on 127.0.0.1 serving the real zips (no other network traffic):
files land with the official md5, nothing half-written or corrupt is kept, correct files are not fetched again,
progress is shown, and a network failure names the URL and the fix."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

import metafunc.data.omniglot as omniglot_module
from metafunc.data import OMNIGLOT_MD5, download_omniglot, load_omniglot
from metafunc.data._benchmark import DownloadProgress

SMALL = ("images_background_small1", "images_background_small2")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``directory``; records each requested path; ``/cut/<name>`` sends half of ``<name>`` under the full
    Content-Length, then closes (an interrupted transfer)."""

    requests: list[str]

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.requests.append(self.path)
        if self.path.startswith("/cut/"):
            data = (Path(self.directory) / self.path[len("/cut/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """``(base URL, list of requested paths)`` of a server on 127.0.0.1 serving ``folder``; stopped on exit."""
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Requests to 127.0.0.1 go straight to the local server, whatever proxy the environment names."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def official(data_root: Path) -> Path:
    root = data_root / "omniglot"
    if not all((root / f"{name}.zip").is_file() for name in SMALL):
        pytest.fail(f"{root} must hold the official small zips")
    return root


def test_download_small_lands_with_the_official_md5(official: Path, tmp_path: Path, capsys):
    with serve(official) as (url, requests):
        paths = download_omniglot(tmp_path / "dl", variant="small", base_url=url)
    assert paths == [tmp_path / "dl" / f"{name}.zip" for name in SMALL]
    assert [md5(p) for p in paths] == [OMNIGLOT_MD5[name] for name in SMALL]
    assert sorted(os.listdir(tmp_path / "dl")) == [f"{name}.zip" for name in SMALL]  # no temporary file left
    assert requests == [f"/{name}.zip" for name in SMALL]
    err = capsys.readouterr().err  # progress on stderr: a line per quarter when it is not a terminal
    for name in SMALL:
        size = (official / f"{name}.zip").stat().st_size
        assert f"{name}.zip: 0.0 / {size / 1e6:.1f} MB (0%)" in err
        assert f"{name}.zip: {size / 1e6:.1f} / {size / 1e6:.1f} MB (100%)" in err
    # the downloaded zips are the release load_omniglot reads (its md5 check passes)
    assert load_omniglot(tmp_path / "dl", cache_dir=tmp_path / "cache").num_classes == 242


def test_files_with_the_right_md5_are_not_fetched_again(official: Path, tmp_path: Path, capsys):
    root = tmp_path / "dl"
    root.mkdir()
    shutil.copy(official / f"{SMALL[0]}.zip", root / f"{SMALL[0]}.zip")
    with serve(official) as (url, requests):
        download_omniglot(root, base_url=url, progress=False)
        assert requests == [f"/{SMALL[1]}.zip"]
        download_omniglot(root, base_url=url, progress=False)
        assert requests == [f"/{SMALL[1]}.zip"]  # both present and correct: nothing fetched
        # a present file with a wrong md5 (here truncated) is fetched again and replaced by the official one
        data = (official / f"{SMALL[0]}.zip").read_bytes()
        (root / f"{SMALL[0]}.zip").write_bytes(data[:1000])
        download_omniglot(root, base_url=url, progress=False)
        assert requests == [f"/{SMALL[1]}.zip", f"/{SMALL[0]}.zip"]
    assert md5(root / f"{SMALL[0]}.zip") == OMNIGLOT_MD5[SMALL[0]]
    assert capsys.readouterr().err == ""  # progress=False prints nothing


def test_a_corrupt_served_file_is_refused_and_not_kept(official: Path, tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(official / f"{SMALL[0]}.zip", served / f"{SMALL[0]}.zip")
    data = bytearray((official / f"{SMALL[1]}.zip").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (served / f"{SMALL[1]}.zip").write_bytes(bytes(data))
    bad = hashlib.md5(bytes(data)).hexdigest()
    root = tmp_path / "dl"
    with serve(served) as (url, _):
        with pytest.raises(ValueError, match=rf"^download_omniglot: {url}{SMALL[1]}.zip has md5 {bad} but the "
                                             rf"official {SMALL[1]}.zip has md5 {OMNIGLOT_MD5[SMALL[1]]}; the download "
                                             r"is corrupt or not the official release \(nothing was kept\)$"):
            download_omniglot(root, base_url=url, progress=False)
    assert os.listdir(root) == [f"{SMALL[0]}.zip"]  # the good one stays; no corrupt zip, no temporary file
    assert md5(root / f"{SMALL[0]}.zip") == OMNIGLOT_MD5[SMALL[0]]


def test_an_interrupted_transfer_leaves_nothing(official: Path, tmp_path: Path):
    root = tmp_path / "dl"
    with serve(official) as (url, requests):
        with pytest.raises(OSError, match=rf"^download_omniglot: could not download {url}cut/{SMALL[0]}.zip "
                                          r"\(ConnectionError: the transfer stopped after \d+ of \d+ bytes\); "
                                          r"check the network, or download "
                                          rf"{SMALL[0]}.zip by hand .* and copy it into {root}$"):
            download_omniglot(root, base_url=url + "cut/", progress=True)
        assert requests == [f"/cut/{SMALL[0]}.zip"]
    assert os.listdir(root) == []


def test_network_failures_name_the_url_and_the_fix(official: Path, tmp_path: Path):
    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "dl"
    with pytest.raises(OSError, match=rf"^download_omniglot: could not download http://127.0.0.1:{port}/{SMALL[0]}.zip"
                                      rf" \(URLError: .*\); check the network, or download {SMALL[0]}.zip by hand "
                                      rf"\(from http://127.0.0.1:{port}/{SMALL[0]}.zip\) and copy it into {root}$"):
        download_omniglot(root, base_url=f"http://127.0.0.1:{port}", progress=False)
    assert os.listdir(root) == []
    with serve(tmp_path / "dl") as (url, _):  # a server without the file: HTTP 404
        with pytest.raises(OSError, match=rf"could not download {url}{SMALL[0]}.zip \(HTTPError: HTTP Error 404"):
            download_omniglot(root, base_url=url, progress=False)
    assert os.listdir(root) == []


def test_full_variant_fetches_its_two_zips(official: Path, tmp_path: Path, monkeypatch):
    # the small zips stand in for the full ones (served under their names, with their md5s)
    served = tmp_path / "served"
    served.mkdir()
    for full, small in zip(("images_background", "images_evaluation"), SMALL):
        (served / f"{full}.zip").symlink_to(official / f"{small}.zip")
        monkeypatch.setitem(OMNIGLOT_MD5, full, OMNIGLOT_MD5[small])
    with serve(served) as (url, requests):
        paths = download_omniglot(tmp_path / "dl", variant="full", base_url=url.rstrip("/"), progress=False)
    assert requests == ["/images_background.zip", "/images_evaluation.zip"]
    assert [md5(p) for p in paths] == [OMNIGLOT_MD5[name] for name in SMALL]


def test_load_omniglot_download_fetches_only_what_it_needs(official: Path, tmp_path: Path, monkeypatch):
    root = tmp_path / "dl"
    root.mkdir()
    shutil.copy(official / f"{SMALL[0]}.zip", root / f"{SMALL[0]}.zip")
    with serve(official) as (url, requests):
        monkeypatch.setattr(omniglot_module, "OMNIGLOT_URL", url)
        data = load_omniglot(root, download=True, cache_dir=tmp_path / "cache")
        assert data.num_classes == 242 and requests == [f"/{SMALL[1]}.zip"]
        # with check_md5=False a zip that is there is kept as it is, even if it is not the official one
        other = tmp_path / "other"
        other.mkdir()
        shutil.copy(official / f"{SMALL[1]}.zip", other / f"{SMALL[0]}.zip")
        load_omniglot(other, download=True, check_md5=False, cache_dir=tmp_path / "cache")
        assert requests == [f"/{SMALL[1]}.zip", f"/{SMALL[1]}.zip"]
        assert md5(other / f"{SMALL[0]}.zip") == OMNIGLOT_MD5[SMALL[1]]


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match=r"^download_omniglot: variant must be 'small' or 'full' \(got 'medium'\)$"):
        download_omniglot(tmp_path, variant="medium")
    with pytest.raises(TypeError, match=r"^download_omniglot: base_url must be a URL string \(got ''\)$"):
        download_omniglot(tmp_path, base_url="")
    with pytest.raises(TypeError, match=r"^download_omniglot: progress must be a bool \(got 'yes'\)$"):
        download_omniglot(tmp_path, progress="yes")
    with pytest.raises(TypeError, match=r"^download_omniglot: root must be a path \(got int\)$"):
        download_omniglot(3)
    assert os.listdir(tmp_path) == []


def test_progress_on_a_terminal_rewrites_one_line():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    progress = DownloadProgress("x.zip", stream=out, interval=3600.0)
    for done in (0, 1_000_000, 2_000_000, 4_000_000):
        progress(done, 4_000_000)
    progress.close()
    # the first call and the last (100%) are shown, the ones in between are throttled by the interval
    assert out.getvalue() == "\rx.zip: 0.0 / 4.0 MB (0%)\rx.zip: 4.0 / 4.0 MB (100%)\n"
    out = Terminal()
    progress = DownloadProgress("x.zip", stream=out, interval=3600.0)
    progress(0, 4_000_000)
    progress(2_000_000, 4_000_000)  # throttled, then shown by close (an interrupted download's last state)
    progress.close()
    assert out.getvalue() == "\rx.zip: 0.0 / 4.0 MB (0%)\rx.zip: 2.0 / 4.0 MB (50%)\n"
    unknown = io.StringIO()
    progress = DownloadProgress("y.zip", stream=unknown)
    for done in (0, 500_000, 1_500_000):
        progress(done, None)
    assert unknown.getvalue() == "y.zip: 0.0 MB\n"  # no size known: a line when it starts, and one at the end
    progress.close()
    assert unknown.getvalue() == "y.zip: 0.0 MB\ny.zip: 1.5 MB\n"


def test_metafunc_train_download_fetches_the_zips_into_an_empty_data_root(official: Path, tmp_path: Path,
                                                                          monkeypatch, capsys):
    from metafunc.cli import main
    from metafunc.data import omniglot

    root = tmp_path / "fresh" / "omniglot"           # does not exist yet: --download makes it
    argv = ["train", "--dataset", "omniglot", "--data-root", str(root), "--algorithm", "protonet", "--iterations", "1",
            "--meta-batch", "1", "--width", "8", "--val-episodes", "2", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 2                                              # without --download: a clear error
    assert "does not exist" in capsys.readouterr().err
    with serve(official) as (url, requests):
        monkeypatch.setattr(omniglot, "OMNIGLOT_URL", url)
        assert main([*argv, "--download"]) == 0, capsys.readouterr().err
    assert sorted(requests) == [f"/{name}.zip" for name in sorted(SMALL)]
    assert {p.name: md5(p) for p in root.glob("*.zip")} == {f"{n}.zip": md5(official / f"{n}.zip") for n in SMALL}
