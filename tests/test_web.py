"""The demo page: served on the server's port, and its JavaScript parses."""

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from importlib import resources

import pipelines
import pytest
from conftest import async_test, running_server

WEB = resources.files("dsstream.web")


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


@async_test
async def test_demo_page_and_its_assets_are_served():
    async with running_server(pipelines.registry()) as server:
        loop = asyncio.get_running_loop()
        status, ctype, html = await loop.run_in_executor(None, _get, server.http_url)
        assert status == 200 and ctype.startswith("text/html")
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', html)
        assert set(assets) == {"/app.js", "/style.css"}
        for asset in assets + ["/worklet.js"]:
            status, ctype, body = await loop.run_in_executor(
                None, _get, server.http_url + asset[1:]
            )
            assert status == 200 and body
        with pytest.raises(urllib.error.HTTPError) as info:
            await loop.run_in_executor(None, _get, server.http_url + "nope")
        assert info.value.code == 404


def test_page_wires_the_elements_its_script_uses():
    html = WEB.joinpath("index.html").read_text()
    script = WEB.joinpath("app.js").read_text()
    ids = set(re.findall(r'\$\("([\w-]+)"\)', script))
    missing = [i for i in ids if f'id="{i}"' not in html]
    assert not missing, f"app.js uses ids the page lacks: {missing}"
    assert 'addModule("/worklet.js")' in script
    assert 'registerProcessor("capture-processor"' in WEB.joinpath("worklet.js").read_text()


@pytest.mark.parametrize("name", ["app.js", "worklet.js"])
def test_javascript_has_no_syntax_errors(name, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    path = tmp_path / name
    path.write_text(WEB.joinpath(name).read_text())
    result = subprocess.run([node, "--check", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_node_check_catches_a_syntax_error(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    path = tmp_path / "broken.js"
    path.write_text(WEB.joinpath("app.js").read_text() + "\nfunction (\n")
    assert subprocess.run([node, "--check", str(path)], capture_output=True).returncode != 0


@async_test
async def test_sample_scenes_are_listed_and_served():
    import urllib.error

    from dsstream.pipelines.defaults import SAMPLES_DIR

    async with running_server(pipelines.registry()) as server:
        base = server.http_url.rstrip("/")

        def get(path):
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read()

        status, ctype, body = await asyncio.to_thread(get, "/scenes")
        scenes = json.loads(body)
        assert [s["name"] for s in scenes] == ["scene0.png", "scene1.png", "scene2.png",
                                               "scene3.png"]  # fmt: skip
        assert "which shape does the red object have?" in scenes[0]["questions"]
        status, ctype, png = await asyncio.to_thread(get, "/scenes/scene0.png")
        assert ctype == "image/png" and png == (SAMPLES_DIR / "vqa/images/scene0.png").read_bytes()
        for bad in ("/scenes/questions.tsv", "/scenes/..%2Fimages%2Fscene0.png", "/scenes/x.png"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                await asyncio.to_thread(get, bad)
            assert caught.value.code == 404
