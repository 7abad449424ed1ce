"""The VQA app: scene generator, tokenizer, model, export, the image KV cache, the pipeline."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apps.vqa.model import VqaConfig, VqaModel
from apps.vqa.scenes import (
    ANSWERS,
    COLOURS,
    SHAPES,
    TEMPLATES,
    all_template_texts,
    answer,
    make_scene,
    questions,
    render,
)
from dsstream.tokenizer import WordTokenizer

# -- scenes ------------------------------------------------------------------------


def _pixel_objects(image: np.ndarray) -> dict[str, tuple[float, float, str]]:
    """Independent of the generator: each colour's pixel centroid, and its shape
    (a square fills its bounding box; a circle leaves the corners empty)."""
    out = {}
    for name, rgb in COLOURS.items():
        mask = np.abs(image.astype(int) - np.array(rgb)).sum(-1) < 30
        ys, xs = np.nonzero(mask)
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        out[name] = (xs.mean() + 0.5, ys.mean() + 0.5, "square" if mask.sum() == box else "circle")
    return out


@pytest.mark.parametrize("seed", range(20))
def test_scenes_have_six_separate_objects_one_per_colour(seed):
    scene = make_scene(random.Random(seed))
    assert len(scene.objects) == 6 and {o.colour for o in scene.objects} == set(COLOURS)
    image = np.asarray(render(scene))
    assert image.shape == (75, 75, 3)
    r = scene.radius
    found = _pixel_objects(image)
    for o in scene.objects:
        x, y, shape = found[o.colour]
        assert abs(x - o.x) < 1.0 and abs(y - o.y) < 1.0  # drawn where it says, unoccluded
        assert shape == o.shape
        assert r <= o.x <= 75 - r and r <= o.y <= 75 - r
    for a in scene.objects:  # no two overlap, whatever their shapes
        for b in scene.objects:
            if a is not b:
                assert max(abs(a.x - b.x), abs(a.y - b.y)) > 2 * r


@pytest.mark.parametrize("seed", range(20))
def test_answers_match_an_independent_pixel_check(seed):
    rng = random.Random(100 + seed)
    scene = make_scene(rng)
    found = _pixel_objects(np.asarray(render(scene)))
    shape = {c: v[2] for c, v in found.items()}
    for qa in questions(scene, rng, per_type=6):
        x, y, _ = found[qa.colour]
        others = {c: v for c, v in found.items() if c != qa.colour}
        dist = {c: math.hypot(v[0] - x, v[1] - y) for c, v in others.items()}
        ranked = sorted(dist.values())
        if (
            qa.kind in ("closest", "furthest")
            and min(ranked[1] - ranked[0], ranked[-1] - ranked[-2]) < 1.5
        ):
            continue  # a near tie that pixel centroids cannot settle
        if qa.kind in ("horizontal", "vertical") and abs((x, y)[qa.kind == "vertical"] - 37.5) < 1:
            continue  # centred to within a pixel
        expected = {
            "shape": shape[qa.colour],
            "horizontal": "left" if x < 37.5 else "right",
            "vertical": "top" if y < 37.5 else "bottom",
            "closest": shape[min(dist, key=dist.get)],
            "furthest": shape[max(dist, key=dist.get)],
            "count": str(sum(s == shape[qa.colour] for s in shape.values())),
        }[qa.kind]
        assert qa.answer == expected, (qa, expected)
        assert qa.answer in ANSWERS and qa.relational == TEMPLATES[qa.kind][0]
        assert qa.colour in qa.text


def test_questions_cover_every_type_and_larger_images_work():
    rng = random.Random(7)
    scene = make_scene(rng, size=150)
    assert scene.radius == 10 and np.asarray(render(scene)).shape == (150, 150, 3)
    kinds = [qa.kind for qa in questions(scene, rng, per_type=2)]
    assert sorted(set(kinds)) == sorted(TEMPLATES) and len(kinds) == 12
    with pytest.raises(ValueError):
        answer(scene, "colour", "red")


def test_template_texts_are_spoken_forms():
    texts = all_template_texts()
    assert len(texts) == sum(len(f) for _, f in TEMPLATES.values()) * 6
    assert all("?" not in t and "{" not in t for t in texts)


@pytest.mark.parametrize("size", [75, 150])
def test_cell_targets_put_each_object_in_its_cell_with_its_shape_and_centre(size):
    from apps.vqa.parse import cell_targets

    rng = random.Random(size)
    scenes = [make_scene(rng, size) for _ in range(8)]
    images = torch.stack([torch.from_numpy(np.array(render(s))).permute(2, 0, 1) for s in scenes])
    stride = 8
    grid = -(-size // stride)
    colour, shape, centre, nearest, farthest = cell_targets(images, grid, stride)
    assert colour.shape == shape.shape == (8, grid * grid) and centre.shape == (8, grid * grid, 2)
    assert ((colour > 0).sum(1) == 6).all() and ((shape >= 0) == (colour > 0)).all()
    names = list(COLOURS)
    for b, scene in enumerate(scenes):
        for o in scene.objects:  # the generator's geometry, not the pixels
            (cell,) = (colour[b] == names.index(o.colour) + 1).nonzero()[:, 0].tolist()
            row, col = divmod(cell, grid)
            assert (
                abs(row * stride - o.y) <= stride / 2 + 1
                and abs(col * stride - o.x) <= stride / 2 + 1
            )
            assert shape[b, cell] == SHAPES.index(o.shape)
            x, y = ((centre[b, cell] + 1) * (size - 1) / 2).tolist()
            assert abs(x + 0.5 - o.x) < 1 and abs(y + 0.5 - o.y) < 1  # pixel centres sit at +0.5
            dist = sorted(math.hypot(p.x - o.x, p.y - o.y) for p in scene.objects if p is not o)
            for kind, got, gap in (("closest", nearest, dist[1] - dist[0]),
                                   ("furthest", farthest, dist[-1] - dist[-2])):  # fmt: skip
                if gap > 1.5:  # a nearer tie is below what pixel centroids resolve
                    assert got[b, cell] == SHAPES.index(answer(scene, kind, o.colour))
    assert ((nearest >= 0) == (colour > 0)).all() and ((farthest >= 0) == (colour > 0)).all()


def test_cell_targets_refuse_other_images_and_the_loss_is_zero_when_perfect():
    from apps.vqa.parse import CELL_OUTPUTS, cell_targets, parse_loss

    with pytest.raises(ValueError, match="uint8"):
        cell_targets(torch.rand(1, 3, 75, 75), 10, 8)
    with pytest.raises(ValueError, match="palette"):
        cell_targets(torch.full((1, 3, 75, 75), 255, dtype=torch.uint8), 10, 8)
    image = torch.from_numpy(np.array(render(make_scene(random.Random(3))))).permute(2, 0, 1)
    targets = cell_targets(image[None], 10, 8)
    hot = [F.one_hot(t.clamp(min=0), n) * 50.0 for t, n in zip(targets[:2], (7, 2))]
    hot += [targets.centre] + [F.one_hot(t.clamp(min=0), 2) * 50.0 for t in targets[3:]]
    logits = torch.cat(hot, -1)
    assert logits.shape[-1] == CELL_OUTPUTS
    loss, accuracy = parse_loss(logits, targets)
    assert float(loss) < 1e-6 and float(accuracy) == 1.0
    loss, accuracy = parse_loss(-logits, targets)  # every class wrong
    assert float(loss) > 50 and float(accuracy) == 0.0


# -- tokenizer ---------------------------------------------------------------------


def test_tokenizer_ignores_case_and_punctuation_and_maps_unknown_words():
    tok = WordTokenizer.build(["what is the shape of the red object?"], max_len=6)
    assert tok.vocab[:2] == ("<pad>", "<unk>")
    a = tok.encode("What is the SHAPE of the red object??")
    assert a == tok.encode("what is the shape of the red object")[:6] and len(a) == 6
    assert tok.encode("what is the zorblax") == tok.encode("what is the")[:3] + [1]
    assert tok.unknown("What's the zorblax?") == ["what's", "zorblax"]
    batch = tok.batch(["red", "what is the shape of the red object"])
    assert batch.shape == (2, 6) and batch[0, 1:].tolist() == [0] * 5
    with pytest.raises(ValueError):
        WordTokenizer(("a", "b"))


# -- model -------------------------------------------------------------------------


def _tiny_cfg(**kw) -> VqaConfig:
    base = dict(d_model=16, heads=2, image_layers=1, question_layers=1, fuser_layers=2,
                vocab=len(_tok().vocab), max_len=16)  # fmt: skip
    return VqaConfig(**{**base, **kw})


def _tok() -> WordTokenizer:
    from apps.vqa.prepare import tokenizer

    return tokenizer()


def test_model_shapes_and_grouped_questions_equal_one_by_one():
    torch.manual_seed(0)
    model = VqaModel(_tiny_cfg()).eval()
    images = torch.rand(3, 3, 75, 75)
    tokens = torch.randint(1, model.cfg.vocab, (3, 4, 9))
    tokens[:, :, 6:] = 0  # padding
    with torch.no_grad():
        kv = model.image(images)
        assert kv.shape == (3, 2, 2, 100, 16)
        grouped = model.question(tokens, kv)
        assert grouped.shape == (3, 4, 12)
        for q in range(4):
            alone = model.question(tokens[:, q : q + 1, :6], kv)[:, 0]
            torch.testing.assert_close(alone, grouped[:, q], atol=1e-5, rtol=1e-5)


def test_gated_cross_attention_starts_as_identity():
    torch.manual_seed(0)
    model = VqaModel(_tiny_cfg(gated=True)).eval()
    tokens = torch.randint(1, model.cfg.vocab, (2, 1, 8))
    with torch.no_grad():
        a = model(torch.rand(2, 3, 75, 75), tokens)
        b = model(torch.rand(2, 3, 75, 75), tokens)
    torch.testing.assert_close(a, b)  # the image cannot matter before the gates open


def test_a_tiny_training_run_learns_beyond_chance(tmp_path):
    """A small model fits 32 scenes: the same questions have different answers in
    different scenes, so only reading the image gets them right."""
    import shutil

    from apps.vqa.prepare import main as prepare
    from apps.vqa.train import main as train

    prepare(["--out", str(tmp_path), "--train", "32", "--valid", "10", "--test", "10"])
    shutil.copy(tmp_path / "train.npz", tmp_path / "valid.npz")  # score what it was fit on
    state = train(["--data", str(tmp_path), "--epochs", "60", "--batch", "8",
                   "--d-model", "32", "--image-layers", "1", "--fuser-layers", "2",
                   "--threads", "2", "--warmup", "20", "--lr", "3e-3"])  # fmt: skip
    first, last = state["history"][0], state["history"][-1]
    # Chance is 1/2 for most types and lower for counts; each question type's most
    # common answer scores about 55% on these scenes.
    assert last["all"] > 0.72 and last["all"] > first["all"] + 0.3, (first, last)
    assert (tmp_path / "ckpt" / "last.pt").exists()
    # INT8: post-training quantization and quantization-aware fine-tuning keep what it learned.
    from apps.vqa.quantize import main as quantize

    ptq = quantize(["--data", str(tmp_path), "--calib", "16", "--out", str(tmp_path / "int8")])
    assert ptq["int8"]["all"] > ptq["float"]["all"] - 0.1
    qat = train(["--data", str(tmp_path), "--qat", "--epochs", "3", "--batch", "8", "--lr", "3e-4",
                 "--threads", "2", "--warmup", "5"])  # fmt: skip
    assert len(qat["history"]) == 3 and (tmp_path / "ckpt" / "qat.pt").exists()
    assert qat["history"][-1]["all"] > 0.72  # fine-tuned under fake quantization: still fits
    from_qat = quantize(["--data", str(tmp_path), "--qat"])  # scored on the unseen test scenes
    assert from_qat["qat"] and from_qat["int8"]["all"] > from_qat["float"]["all"] - 0.1
    assert {p.name for p in (tmp_path / "int8").iterdir()} == {"image-int8.ds", "fuser-int8.ds"}
    from apps.vqa.prune import main as prune

    rows = prune(["--data", str(tmp_path), "--amounts", "0.5", "--finetune-steps", "5"])["rows"]
    assert rows[1]["parameters"] < rows[0]["parameters"] and rows[1]["image_ms"] > 0


# -- export, cache, pipeline ---------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny random model exported as the two engine stages."""
    from apps.vqa.export import export_stages

    torch.manual_seed(0)
    model = VqaModel(_tiny_cfg()).eval()
    out = tmp_path_factory.mktemp("vqa")
    image, fuser = export_stages(model, _tok(), out)
    return model, image, fuser


def _png(seed: int, size: int = 75) -> bytes:
    buf = io.BytesIO()
    render(make_scene(random.Random(seed), size)).save(buf, "PNG")
    return buf.getvalue()


def test_exported_stages_equal_eager(stages):
    from engine import InferenceEngine

    model, image_path, fuser_path = stages
    images = torch.rand(3, 3, 75, 75)
    tokens = torch.from_numpy(_tok().batch(["what shape is the red object", "is it left"]))
    tokens = tokens[:, :7]
    with torch.no_grad():
        kv = model.image(images)
        probs = model.question(tokens[None].expand(3, -1, -1), kv).softmax(-1)
    kv_engine = InferenceEngine(image_path).infer({"image": images.numpy()})["kv"]
    np.testing.assert_allclose(kv_engine, kv.numpy(), atol=1e-4, rtol=1e-4)
    fuser = InferenceEngine(fuser_path)
    for q in range(2):
        out = fuser.infer({"tokens": tokens[q : q + 1].expand(3, -1).numpy(), "kv": kv.numpy()})
        np.testing.assert_allclose(out["probs"], probs[:, q].numpy(), atol=1e-4, rtol=1e-4)


def test_image_kv_cache_answers_busy_when_every_block_is_held():
    """The paged store itself is tested in test_kv_cache.py; here, its
    OutOfBlocks becomes the client's ``busy``."""
    from dsstream.pipelines.base import PipelineError
    from dsstream.pipelines.vqa import ImageKVCache

    shape = (2, 2, 100, 8)
    cache = ImageKVCache(shape, cap_bytes=2 * 2 * 100 * 8 * 4)  # room for one image
    held = cache.acquire(b"a", lambda: np.ones(shape, np.float32))
    with pytest.raises(PipelineError) as err:
        cache.acquire(b"b", lambda: np.zeros(shape, np.float32))
    assert err.value.code.value == "busy" and "image cache is full" in err.value.message
    cache.release(held)
    again = cache.acquire(b"b", lambda: np.zeros(shape, np.float32))
    assert (cache.read(again) == 0).all() and cache.stats()["misses"] == 2


def test_pipeline_answers_reuses_the_image_and_refuses_bad_input(stages):
    from dsstream.options import VqaOptions
    from dsstream.pipelines.base import PipelineError
    from dsstream.pipelines.vqa import VqaRuntime
    from dsstream.protocol import Answer, ImageData, Question

    _, image_path, fuser_path = stages
    rt = VqaRuntime(image_path, fuser_path)
    for engine in (rt.image_engine, rt.fuser_engine):  # VqaConfig.engine_threads
        assert engine.backend.session.get_session_options().intra_op_num_threads == 1
    pipe = rt.pipeline()
    eff = pipe.begin(VqaOptions())
    assert eff["image_size"] == 75 and len(eff["answers"]) == 12
    with pytest.raises(PipelineError) as err:
        pipe.step(Question("q0", "what shape is the red object?"))
    assert err.value.code.value == "no_image"
    pipe.step(ImageData(_png(1)))
    (ans,) = pipe.step(Question("q1", "what shape is the red object?"))
    assert isinstance(ans, Answer) and ans.text in ANSWERS and 0 < ans.score <= 1
    with pytest.raises(PipelineError) as err:
        pipe.step(ImageData(b"not an image"))
    assert err.value.code.value == "bad_image"
    (again,) = pipe.step(Question("q2", "what shape is the red object?"))
    assert (again.text, again.score) == (ans.text, ans.score)  # the old image stayed
    other = rt.pipeline()
    other.begin(VqaOptions())
    other.step(ImageData(_png(1, size=150)))  # resized to the model's size
    before = rt.cache.stats()
    other.step(ImageData(_png(1)))  # the same picture as the first session: a cache hit
    assert rt.cache.stats()["hits"] == before["hits"] + 1
    assert other.image_ms < 1000
    pipe.end()
    other.end()
    rt.close()


def test_vqa_over_loopback_with_bad_images_and_spoken_questions(stages):
    import asyncio

    import pipelines
    from conftest import running_server

    from dsstream.client import Client, ServerError
    from dsstream.pipelines.base import ArtifactPipelineFactory, PipelineRegistry
    from dsstream.protocol import Answer, Final

    _, image_path, fuser_path = stages
    asr = pipelines.StaticFactory("asr", "counting", pipelines.CountingAsr)
    vqa = ArtifactPipelineFactory("vqa", "tiny", {"image": image_path, "fuser": fuser_path},
                                  "dsstream.pipelines.vqa:load", extra={"asr": asr})  # fmt: skip
    bomb = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (9000, 9000)).save(bomb, "PNG")

    async def main():
        async with running_server(PipelineRegistry([asr, vqa])) as server:
            async with Client(server.url) as client:
                await client.start("vqa")
                with pytest.raises(ServerError) as err:
                    await client.ask("what shape is the red object?")
                assert err.value.code.value == "no_image"
                await client.send_image(bomb.getvalue())
                await client.send_image(b"\x89PNG garbage")
                errors = [await client.recv(timeout=30), await client.recv(timeout=30)]
                await client.send_image(_png(3))
                typed = await client.ask("what shape is the red object?")
                again = await client.ask("What shape is the RED object")
                await client.end()
                rest = [e async for e in client.events()]
            assert rest[-1].type == "ended"
            async with Client(server.url) as client:
                await client.start("vqa", speech={"sample_rate": 16000})
                await client.send_image(_png(3))
                await client.send_audio(np.zeros(8000, np.float32))
                await client.flush()
                await client.end()
                spoken = [e async for e in client.events()]
            return typed, again, errors, spoken

    typed, again, errors, spoken = asyncio.run(main())
    assert isinstance(typed, Answer) and typed.text in ANSWERS and typed.transcript is None
    assert (again.text, again.score) == (typed.text, typed.score)  # case and "?" do not matter
    # Both bad images were refused while the session went on.
    assert [(e.code.value, e.fatal) for e in errors] == [("bad_image", False)] * 2
    assert "pixels" in errors[0].message
    finals = [e for e in spoken if isinstance(e, Final)]
    answers = [e for e in spoken if isinstance(e, Answer)]
    assert [f.text for f in finals][:1] == ["8000"]  # the counting recognizer's transcript
    assert answers[0].transcript == "8000" and answers[0].id == "spoken-0"
    assert answers[0].text in ANSWERS


def test_cli_ask_in_process_and_against_a_server(stages, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    from conftest import server_thread

    from dsstream.pipelines.defaults import default_registry

    _, image_path, fuser_path = stages
    samples = tmp_path / "samples"
    (samples / "vqa").mkdir(parents=True)
    shutil.copy(image_path, samples / "vqa" / "image.ds")
    shutil.copy(fuser_path, samples / "vqa" / "fuser.ds")
    picture = tmp_path / "scene.png"
    picture.write_bytes(_png(5))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dsstream.cli", "ask", str(picture),
                               "what shape is the gray object?", "--json", *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    local = cli("--samples", str(samples))
    assert local.returncode == 0, local.stderr
    with server_thread(default_registry(samples)) as url:
        remote = cli("--server", url)
    assert remote.returncode == 0, remote.stderr
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["text"] == b["text"] and a["text"] in ANSWERS
    assert abs(a["score"] - b["score"]) < 1e-4
    missing = cli("--samples", str(tmp_path / "none"))
    assert missing.returncode == 2 and "image.ds" in missing.stderr
